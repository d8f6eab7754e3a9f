"""One member, assembled from its spec: data, transforms, model, optimiser, loop.

Still no Ray and no MLflow: `train_member` takes the rank, world size and device it runs
on, an optional resume state, and a per-epoch callback. `orchestrator/runtime/member_worker.py`
calls it in a member's Tune trial process or in each of its Ray Train workers; tests call
it directly on CPU.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ensemble.core.math import topk_error
from models import build_model, get_spec
from models.cost import inference_cost
from orchestrator.config import Data, ResolvedMember
from orchestrator.data.dataset import Split, TooManyBadImages, carve_minival, open_split, take_share
from orchestrator.data.streams import EvalStream, TrainStream
from orchestrator.train import augment, batch_augment, confusion, loop, lr, teacher
from orchestrator.train.resident_batches import hold_resident, resident_batches
from orchestrator.train.optim import build_optimizer
from orchestrator.train.pass_batches import loader_batches
from orchestrator.train.prefetch import Prefetcher


CHECKPOINT_FILE, PREDICTIONS_FILE, LABELS_FILE = "model.pt", "predictions.npy", "labels.npy"
MINIVAL_PREDICTIONS_FILE, MINIVAL_LABELS_FILE = "minival_predictions.npy", "minival_labels.npy"
PREDICTION_FILES = (PREDICTIONS_FILE, LABELS_FILE, MINIVAL_PREDICTIONS_FILE, MINIVAL_LABELS_FILE)


@dataclass
class MemberData:
    train: Split
    val: Split
    max_bad_images: int = 50
    minival: Split | None = None  # held out of train: every choice is made on it (data/minival.py)
    resident: bool | str = "auto"  # data.resident: train held decoded on the device (data/resident.py)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def heldout(self) -> Split:
        """The split of the per-epoch metrics and the final epoch's kept predictions."""
        return self.minival if self.minival is not None else self.val

    @property
    def heldout_name(self) -> str:
        return "minival" if self.minival is not None else "val"


def open_member_data(data: Data, share: int | None = None) -> MemberData:
    """The member's splits; with `data.shares`, train is the member's `share` of it."""
    train = open_split(data.root, data.train_split, data.classes, data.train_per_class, data.num_classes)
    held = None
    if data.minival:  # train is read once and carved in two
        train, held = carve_minival(train, data.minival, data.minival_seed)
    if data.shares and share is not None:
        train = take_share(train, data.shares, share)
    val = open_split(data.root, data.val_split, data.classes, data.val_per_class, data.num_classes)
    return MemberData(train, val, data.max_bad_images, held, data.resident)


def eval_transform_of(member: ResolvedMember):
    """The member's own eval transform, from its registry entry and input size."""
    spec = get_spec(member.arch).eval_transform(member.low_res, member.input_size)
    return spec, augment.build_eval_transform(spec.resize, spec.crop, spec.mean, spec.std)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_eval_loader(split: Split, transform, batch_size: int, workers: int, rank=0, world=1) -> DataLoader:
    return DataLoader(EvalStream(split, transform, rank, world), batch_size=batch_size, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def train_member(member: ResolvedMember, data: MemberData, *, device: torch.device, rank: int = 0, world: int = 1,
                 resume: dict | None = None, prepare_model: Callable = lambda m: m,
                 on_epoch_end: Callable | None = None, on_notes: Callable[[dict], None] = lambda notes: None
                 ) -> tuple[torch.nn.Module, loop.FitState]:
    """Train `member` on this rank. `prepare_model` wraps the model for data parallelism
    (Ray's `prepare_model` -> DDP); `on_epoch_end(state, metrics, model, optimizer, probs)`,
    where probs (final epoch only) is this rank's part of the val predictions (`predict`'s form).
    What the recipe's Hikvision options did is printed (rank 0) and handed to `on_notes`
    ({tag: text}: the member layer sets them as tags on the member's run)."""
    said: dict[str, str] = {}
    recipe = member.recipe
    seed_everything(member.seed)  # same init on every rank; DDP also broadcasts rank 0's
    model = build_model(member.arch, num_classes=data.num_classes, low_res=member.low_res)
    if resume:
        model.load_state_dict(resume["state_dict"])
    if device.type == "cuda" and recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model.to(device))
    if recipe.compile:
        model = torch.compile(model)

    base_lr = lr.scaled_lr(recipe.optimizer.lr, recipe.batch_size * world)  # the global batch
    optimizer = build_optimizer(model, recipe.optimizer, base_lr)
    state = loop.FitState()
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        state = loop.FitState(resume["epoch"], resume["step"], list(resume.get("history", [])))

    fields = recipe.augment.fields()
    ev, eval_tf = eval_transform_of(member)
    workers = member.resources.loader_workers
    plain_from = recipe.epochs - recipe.plain_last_epochs if recipe.plain_last_epochs else None
    held = hold_resident(member, data.resident, data.train, device, said)
    if held is not None:
        stream = resident_batches(member, fields, ev, held, data.train, device, rank, world, state.epoch, plain_from)
        train_batches = iter(stream)
    elif decode_on_device(member, device):
        stream = TrainStream(data.train, None, rank, world, seed=member.seed, start_pass=state.epoch,
                             label_shuffling=recipe.label_shuffling, batch_size=recipe.batch_size,
                             max_steps=recipe.max_steps_per_epoch)
        train_batches = device_batches(member, fields, ev, stream, device, plain_from)
    else:
        started = time.perf_counter()
        cam_maps = teacher.load_cam_maps(recipe, data.train, device, workers)
        if cam_maps is not None:
            said["hikvision.cam_crops"] = (f"CAM maps from teacher {recipe.cam_crops.teacher.member}: "
                                           f"{len(cam_maps)} images in {time.perf_counter() - started:.1f} s, "
                                           f"{recipe.cam_crops.probability:.0%} of crops guided")
        train_tf = augment.build_train_transform(fields, member.input_size, ev.mean, ev.std, cam_maps,
                                                 recipe.cam_crops.probability if recipe.cam_crops else 1.0)
        plain_tf = augment.build_train_transform(augment.plain_fields(fields), member.input_size, ev.mean, ev.std)
        stream = TrainStream(data.train, train_tf, rank, world, seed=member.seed, start_pass=state.epoch,
                             label_shuffling=recipe.label_shuffling, plain_transform=plain_tf,
                             plain_from_pass=plain_from, batch_size=recipe.batch_size,
                             max_steps=recipe.max_steps_per_epoch)
        train_batches = iter(loader_batches(stream, workers, device))
    steps_per_epoch = stream.steps  # one whole pass (or its capped part), every rank the same
    val_loader = build_eval_loader(data.heldout, eval_tf, recipe.batch_size * 2, workers, rank, world)
    cl = recipe.channels_last and device.type == "cuda"
    smoothing = teacher.load_confusion_smoothing(recipe, data.train.class_names)
    if smoothing is not None:
        cp = recipe.confusion_prior
        said["hikvision.confusion_prior"] = (f"confusion prior from teacher {cp.teacher.member}: label smoothing "
                                             f"{fields.label_smoothing:g} spread over each class's top-{cp.k} "
                                             f"confused classes")
    if recipe.label_shuffling:
        counts = np.bincount(data.train.all_labels(), minlength=data.num_classes)
        said["hikvision.label_shuffling"] = (f"label-shuffled epoch: {data.num_classes} classes x {counts.max()} = "
                                             f"{data.num_classes * counts.max()} samples (classes of "
                                             f"{counts.min()} to {counts.max()} images)")
    if recipe.plain_last_epochs:
        said["hikvision.plain_last_epochs"] = f"strong augmentation off for the last {recipe.plain_last_epochs} epochs"
    if data.train.share:  # "2 of 4": the member's own share of train (orchestrator/data/shares.py)
        said["data.share"] = f"trains on share {data.train.share} of train: {len(data.train)} images"
    criterion = teacher.distilled(confusion.PriorSmoothingLoss(smoothing).to(device) if smoothing is not None
                                  else loop.build_criterion(fields.label_smoothing), recipe,
                                  data.train.class_names, (member.input_size, ev.mean, ev.std), device, said)
    if rank == 0:
        for tag, text in said.items():  # the data placement only as a tag on the member's run
            if tag.startswith(("hikvision.", "data.share", "distill")):
                print(f"member {member.name}: {text}", flush=True)
    on_notes(dict(said))
    compile_pending = recipe.compile
    seen_bad = {"train": stream.bad.total, "val": val_loader.dataset.bad.total}

    def epoch_end(st, metrics, probs):
        count_bad_images(metrics, seen_bad, stream, val_loader.dataset, data.max_bad_images)
        nonlocal compile_pending
        if compile_pending:
            # torch.compile compiles on the first step of each process: its cost, reported
            # once per process start (a resumed member pays it again)
            metrics["compile_s"] = max(0.0, metrics["first_step_s"] - metrics["step_s"])
            compile_pending = False
        if on_epoch_end:
            on_epoch_end(st, metrics, model, optimizer, probs)

    try:
        plan = loop.FitPlan.of(recipe, steps_per_epoch, base_lr, cl, data.heldout_name)
        state = loop.fit(model, optimizer, plan, train_batches, val_loader, device, criterion, state=state,
                         mix=augment.build_batch_mix(fields, data.num_classes), on_epoch_end=epoch_end)
    finally:
        # a trial process trains the next member after this one: stop the prefetch thread
        if hasattr(train_batches, "close"):
            train_batches.close()
    return model, state


def decode_on_device(member: ResolvedMember, device: torch.device) -> bool:
    """`resources.decode`: gpu (checked at config load), cpu, or auto = gpu when training on
    CUDA and every augmentation field has a batch form (see batch_augment.unsupported)."""
    mode = member.resources.decode
    if mode == "auto":
        fields = member.recipe.augment.fields()
        return device.type == "cuda" and not batch_augment.unsupported(fields, member.recipe.cam_crops is not None)
    return mode == "gpu"


def device_batches(member: ResolvedMember, fields, ev, stream: TrainStream, device, plain_from: int | None):
    """Loader processes read encoded bytes; decode and augmentation run on `device`."""
    raw = loader_batches(stream, member.resources.loader_workers, device)

    def build(f):
        return batch_augment.BatchAugment(f, member.input_size, ev.mean, ev.std, device, stream.bad)

    plain = build(augment.plain_fields(fields)) if plain_from is not None else None
    return Prefetcher(iter(raw), batch_augment.PassAugment(build(fields), plain, plain_from).apply, device)



def count_bad_images(metrics: dict, seen: dict, train_stream, val_stream, limit: int) -> None:
    """This epoch's undecodable images (skipped in training, scored blank in validation)
    as metrics; past `limit` the member fails instead of training on a broken data set."""
    train_bad, val_bad = train_stream.bad.total - seen["train"], val_stream.bad.total - seen["val"]
    seen.update(train=train_stream.bad.total, val=val_stream.bad.total)
    metrics.update(bad_images=train_bad, val_bad_images=val_bad)
    if train_bad + val_bad > limit:
        raise TooManyBadImages(f"{train_bad} training and {val_bad} validation images could not be decoded in "
                               f"epoch {metrics.get('epoch')}: more than data.max_bad_images = {limit}")


def scored_pass(model, split: Split, member: ResolvedMember, device, rank=0, world=1,
                name: str = "val") -> tuple[dict, dict]:
    """(`<name>_*` metrics over all ranks, {dataset index: float32 softmax row} for this
    rank's part of `split`), with the member's eval transform."""
    _, eval_tf = eval_transform_of(member)
    loader = build_eval_loader(split, eval_tf, member.recipe.batch_size * 2, member.resources.loader_workers,
                               rank, world)
    return loop.evaluate(model, loader, device, member.recipe.bf16, keep_probs=True, split=name)


def predict(model, split: Split, member: ResolvedMember, device, rank=0, world=1) -> dict:
    """{dataset index: float32 softmax row} for this rank's part of `split`."""
    return scored_pass(model, split, member, device, rank, world)[1]


def assemble_predictions(parts: list[dict], n: int) -> np.ndarray:
    """Merge per-rank {index: row} parts into an [N, C] float32 array in dataset order;
    every index must appear exactly once (no padding, no gaps)."""
    merged: dict[int, torch.Tensor] = {}
    for part in parts:
        for i, row in part.items():
            if i in merged:
                raise RuntimeError(f"sample {i} was scored by two workers")
            merged[i] = row
    if len(merged) != n:
        raise RuntimeError(f"predictions cover {len(merged)} of {n} samples")
    return torch.stack([merged[i] for i in range(n)]).float().numpy()


def split_labels(split: Split) -> np.ndarray:
    return split.all_labels()


def final_predictions(parts: list[dict], split: Split, metrics: dict, name: str = "val"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A final pass's rows (per-rank parts) as the member's stored predictions and their
    labels, in dataset order; the recorded `<name>_*` errors become theirs (`score_stored`)."""
    stored, labels = assemble_predictions(parts, len(split)), split_labels(split)
    score_stored(metrics, stored, labels, name)
    return stored, labels


def score_stored(metrics: dict, probs: np.ndarray, labels: np.ndarray, name: str = "val") -> None:
    """Set the final top-1/top-5 errors to those of the stored predictions, scored as
    `ensemble.evaluate` scores them (one rule: ensemble.core.math), so a member's recorded
    error is exactly its stored predictions' error."""
    metrics.update({f"{name}_top1_err": topk_error(probs, labels, 1), f"{name}_top5_err": topk_error(probs, labels, 5)})


def final_outputs(heldout_parts: dict, gather: Callable[[dict], list[dict]], model, member: ResolvedMember,
                  data: MemberData, metrics: dict, device, rank: int = 0, world: int = 1) -> dict | None:
    """The member's final prediction files {file name: array} (rank 0; None on other ranks),
    from its final epoch's held-out pass (`heldout_parts`, this rank's). With a minival,
    those rows are the minival predictions and val is scored now, once: the only pass
    over val in the member's life, after every choice was made; `metrics` gets both."""
    if rank == 0:  # what the member costs to run, on its record (models/cost.py)
        metrics.update(inference_cost(model, member.arch, member.low_res, eval_transform_of(member)[0].crop,
                                      data.num_classes, device))
    parts = gather(heldout_parts)
    if data.minival is None:
        if rank != 0:
            return None
        stored, labels = final_predictions(parts, data.val, metrics, "val")
        return {PREDICTIONS_FILE: stored, LABELS_FILE: labels}
    held = final_predictions(parts, data.minival, metrics, "minival") if rank == 0 else None
    val_metrics, val_probs = scored_pass(model, data.val, member, device, rank, world, "val")
    metrics.update(val_metrics)
    val_parts = gather(val_probs)
    if rank != 0:
        return None
    stored, labels = final_predictions(val_parts, data.val, metrics, "val")
    return {PREDICTIONS_FILE: stored, LABELS_FILE: labels, MINIVAL_PREDICTIONS_FILE: held[0],
            MINIVAL_LABELS_FILE: held[1]}
