"""The training loop: plain PyTorch on any device, no Ray, no MLflow.

`fit` runs epochs of a fixed number of steps, sets the LR every iteration from the pure
policy in `lr.py`, evaluates on the val split after each epoch and hands the epoch's
metrics to a callback (where the Ray layer checkpoints and the tracking layer logs).
When torch.distributed is initialised (Ray Train does it), metrics are summed over ranks.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ensemble.core.math import true_class_rank
from orchestrator.train import lr as lr_policies


class NonFiniteLoss(RuntimeError):
    """Training diverged; the member must fail loudly instead of saving garbage."""


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)


def _all_reduce(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    # bf16 autocast on GPU only: CPU autocast is slower than fp32 for these convs.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def scale_at(step: int, sizes: Sequence[int]) -> int | None:
    """Multi-scale training: the batch size in px at `step`, a pure function of the step
    (so every DDP rank picks the same size without communicating); None = unchanged."""
    if not sizes:
        return None
    return sizes[random.Random(step).randrange(len(sizes))]


CHECK_EVERY = 20  # steps between host syncs of the loss (a sync per step stalls the GPU queue)


def _check_finite(losses: list[torch.Tensor], sizes: list[int], first_step: int, epoch: int) -> float:
    """The window's loss summed over its images; NonFiniteLoss naming the first bad step.
    One host sync per window instead of one per step, so the GPU queue never drains
    while the Python loop waits for a number."""
    values = torch.stack(losses).float().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise NonFiniteLoss(f"loss is {values[i].item()} at step {first_step + i} (epoch {epoch + 1})")
    return float((values * torch.tensor(sizes, dtype=torch.float32)).sum())


def train_epoch(model, optimizer, batches: Iterator, steps: int, lr_at: Callable[[int], float], state: FitState,
                device, criterion, mix=None, bf16=True, channels_last=False, multiscale: Sequence[int] = ()) -> dict:
    """`steps` optimiser steps; the metrics include `first_step_s` (the first step's wall
    time, which holds torch.compile's compilation) and, on CUDA, `gpu_memory_gb` (peak
    allocated), which the packing planner reads."""
    model.train()
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    window: list[torch.Tensor] = []
    sizes: list[int] = []
    window_start, first_step_s = state.step, None
    for i in range(steps):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)
        size = scale_at(state.step, multiscale)
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = lr_at(state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, bf16):
            # a distillation loss runs its teacher on the very batch the student sees
            loss = criterion(model(images), labels, images) if getattr(criterion, "sees_images", False) \
                else criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        window.append(loss.detach())
        sizes.append(images.shape[0])
        seen += images.shape[0]
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - start
        if len(window) == CHECK_EVERY or i == steps - 1:
            loss_sum += _check_finite(window, sizes, window_start, state.epoch)
            window, sizes, window_start = [], [], state.step
    seconds = time.perf_counter() - start
    loss_sum, seen, seconds = _all_reduce([loss_sum, seen, seconds], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # images/s of the whole member: all ranks' images over the mean rank's wall time
    first = first_step_s or 0.0
    metrics = {"train_loss": loss_sum / max(seen, 1), "lr": lr, "images_per_s": seen / max(seconds / world, 1e-9),
               "first_step_s": first, "step_s": (seconds / world - first) / max(steps - 1, 1)}
    if device.type == "cuda":
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return metrics


@torch.no_grad()
def evaluate(model, loader, device, bf16=True, channels_last=False, keep_probs=False,
             split: str = "val") -> tuple[dict, dict | None]:
    """Top-1/top-5 error and NLL over this rank's part of the split (summed over ranks),
    named `<split>_top1_err` etc.

    With `keep_probs`, also returns {dataset index: float32 softmax row} for this rank.
    """
    model.eval()
    n = correct1 = correct5 = nll = 0.0
    probs: dict[int, torch.Tensor] | None = {} if keep_probs else None
    for idx, images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16):
            logits = model(images).float()
        p = logits.softmax(dim=1)
        # scored on the float32 softmax that is stored, so the epoch's figure is the stored rows'
        rank = true_class_rank(p, labels)  # the platform's one top-k rule (ensemble/core/math.py)
        correct1, correct5 = correct1 + int((rank < 1).sum()), correct5 + int((rank < 5).sum())
        nll += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += labels.shape[0]
        if probs is not None:
            probs.update(zip(idx.tolist(), p.cpu()))
    n, correct1, correct5, nll = _all_reduce([n, correct1, correct5, nll], device)
    metrics = {f"{split}_top1_err": 1 - correct1 / max(n, 1), f"{split}_top5_err": 1 - correct5 / max(n, 1),
               f"{split}_loss": nll / max(n, 1), f"{split}_samples": int(n)}
    return metrics, probs


def build_criterion(label_smoothing: float) -> nn.Module:
    # Soft targets (mixup/cutmix) and label smoothing both go through cross_entropy.
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


@dataclass(frozen=True)
class FitPlan:
    """What `fit` does, fixed before its first step: the epochs, the LR schedule laid over
    them (a pure function of the step, orchestrator/train/lr.py), the numerics, and the
    Hikvision options that change training by epoch."""

    epochs: int
    steps_per_epoch: int
    base_lr: float  # the peak LR, already scaled to the global batch
    schedule: object  # a recipe's Schedule: policy, warmup_epochs, params
    bf16: bool = True
    channels_last: bool = False
    plain_last_epochs: int = 0  # the batch mix off for the last epochs
    multiscale: Sequence[int] = ()
    heldout: str = "val"  # the held-out split's name in the metrics (minival when there is one)

    @classmethod
    def of(cls, recipe, steps_per_epoch: int, base_lr: float, channels_last: bool, heldout: str) -> FitPlan:
        return cls(recipe.epochs, steps_per_epoch, base_lr, recipe.schedule, recipe.bf16, channels_last,
                   recipe.plain_last_epochs, tuple(recipe.multiscale), heldout)


def fit(model, optimizer, plan: FitPlan, batches: Iterator, val_loader, device, criterion, *,
        state: FitState | None = None, mix=None,
        on_epoch_end: Callable[[FitState, dict, dict | None], None] | None = None) -> FitState:
    """Train from `state` (a resumed one, or fresh) to `plan.epochs`; returns the final state.
    `on_epoch_end(state, metrics, probs)`: probs is this rank's {index: float32 softmax row}
    of the held-out split (`val_loader`) after the final epoch, None before it.
    In the last `plan.plain_last_epochs` epochs the batch mix (mixup/cutmix) is off, as the
    data stream's strong augmentation is (Hikvision's train/test consistency)."""
    state = state or FitState()
    steps, schedule = plan.steps_per_epoch, plan.schedule
    warmup = round(schedule.warmup_epochs * steps)
    multiplier = lr_policies.schedule(schedule.policy, plan.epochs * steps, warmup, schedule.params)

    def lr_at(step: int) -> float:
        return plan.base_lr * multiplier(step)

    while state.epoch < plan.epochs:
        start = time.perf_counter()
        plain = state.epoch >= plan.epochs - plan.plain_last_epochs
        metrics = train_epoch(model, optimizer, batches, steps, lr_at, state, device, criterion,
                              None if plain else mix, plan.bf16, plan.channels_last, plan.multiscale)
        # the final epoch's validation pass also yields the member's predictions, so they are
        # the very outputs its final metrics came from (and the split is read once, not twice)
        final = state.epoch + 1 == plan.epochs
        val, probs = evaluate(model, val_loader, device, plan.bf16, plan.channels_last, keep_probs=final,
                              split=plan.heldout)
        state.epoch += 1
        metrics.update(val, epoch=state.epoch, epoch_minutes=(time.perf_counter() - start) / 60,
                       steps_per_epoch=steps)
        state.history.append(metrics)
        if on_epoch_end:
            on_epoch_end(state, metrics, probs)
    return state
