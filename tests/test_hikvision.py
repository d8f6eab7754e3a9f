"""The Hikvision 2016 recipe options (../shared/docs/BACKGROUND.md), each by its behaviour:
label shuffling, CAM-guided crops, label smoothing with a confusion prior, strong
augmentation off for the last epochs, random interpolation, multi-scale training."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from models import build_model, save_checkpoint
from orchestrator.config import parse_config, resolve_members
from orchestrator.data.dataset import Split
from orchestrator.data.streams import TrainStream
from orchestrator.data.passes import plan_pass
from orchestrator.data.sampling import batch_sizes, pass_copies, pass_draws, rank_targets, steps_per_pass
from orchestrator.data.sources import Sample
from orchestrator.base.errors import UserError
from orchestrator.records.runs_file import DatasetRef, EvalRef, MemberRecord, RunsFile, write_runs
from orchestrator.train import augment, loop
from orchestrator.train.cam import CamGuidedCrop, class_activation_maps, sample_centres
from orchestrator.train.confusion import PriorSmoothingLoss, confusion_prior, smoothing_matrix
from orchestrator.train.member import open_member_data, train_member

CPU = torch.device("cpu")
SIZES = {0: 3, 1: 7, 2: 10}  # an imbalanced 3-class split


def imbalanced_labels() -> list[int]:
    labels = [c for c, n in SIZES.items() for _ in range(n)]
    return [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]


# --- label shuffling --------------------------------------------------------------------
def test_label_shuffling_gives_every_class_the_largest_class_count():
    labels = np.asarray(imbalanced_labels())
    one = np.zeros(len(labels), dtype=np.int64)
    copies = pass_copies(labels, one, 1, seed=1, label_shuffling=True)
    assert np.bincount(labels, weights=copies).tolist() == [10, 10, 10] and pass_draws(labels, True) == 30
    for c, n in SIZES.items():  # each sample floor(N / n) or ceil(N / n) times
        assert set(copies[labels == c].tolist()) <= {10 // n, -(-10 // n)}
    assert not np.array_equal(pass_copies(labels, one, 1, seed=2, label_shuffling=True), copies)  # drawn anew
    assert np.array_equal(pass_copies(labels, one, 1, seed=1, label_shuffling=True), copies)


def test_label_shuffled_draws_are_split_across_ranks_without_dropping_any():
    labels = imbalanced_labels()
    split = Split(manifest=None, split="train", kept=[0, 1, 2], per_class=None, records=records(labels))
    plan = plan_pass(split, np.asarray(labels), 4, seed=3, p=0, label_shuffling=True)
    parts = [plan.draws(r) for r in range(4)]
    assert [len(part) for part in parts] == rank_targets(30, 4).tolist() == [8, 8, 7, 7]
    assert Counter(np.asarray(labels)[np.concatenate(parts)].tolist()) == {0: 10, 1: 10, 2: 10}
    assert steps_per_pass(30, 4, 3) == 3 and batch_sizes(7, 3, 3) == [3, 2, 2] and batch_sizes(8, 3, 3) == [3, 3, 2]
    assert batch_sizes(10, 3, 4) == [3, 3, 2, 2]  # a batch and one: never a batch of one


def records(labels) -> list[Sample]:
    return [Sample(f"k{i}", b"", y) for i, y in enumerate(labels)]


class Tagged:
    """A stand-in transform that returns its tag, so a test sees which one ran."""

    def __init__(self, tag):
        self.tag = tag

    def __call__(self, img):
        return torch.tensor(self.tag)


def stream_passes(stream: TrainStream, passes: int, monkeypatch) -> list[list[tuple[int, int]]]:
    monkeypatch.setattr("orchestrator.data.dataset.decode_rgb", lambda data: torch.zeros(1))
    per = stream.samples_per_pass()
    it = iter(stream)
    return [[tuple(int(x) for x in next(it)) for _ in range(per)] for _ in range(passes)]


def test_train_stream_balances_classes_each_pass(monkeypatch):
    split = Split(manifest=None, split="train", kept=[0, 1, 2], per_class=None, records=records(imbalanced_labels()))
    stream = TrainStream(split, Tagged(1), rank=0, world=1, seed=0, label_shuffling=True)
    p1, p2 = stream_passes(stream, 2, monkeypatch)
    assert Counter(y for _, y in p1) == Counter(y for _, y in p2) == {0: 10, 1: 10, 2: 10}


def test_label_shuffling_on_a_streamed_split_without_a_labels_file(tiny_root):
    """The shared Tiny-ImageNet shards have no labels file: the labels come from one pass,
    then each class is drawn N times a pass while the shards stream (tests/test_scale.py
    checks 1,000 classes over 8 ranks)."""
    from orchestrator.data.dataset import open_split

    val = open_split(tiny_root, "val")  # 10,000 images in 2 shards, streamed
    assert val.records is None and val.manifest.split_labels("val") is None
    stream = TrainStream(val, None, 0, 1, seed=0, label_shuffling=True)
    labels = [s.label for s in stream._one_pass(0, 0, 1)]
    assert np.array_equal(np.bincount(labels), np.full(200, 50)) and stream.samples_per_pass() == 10_000


# --- consistency: strong augmentation off for the last epochs ------------------------------
def test_last_passes_use_the_plain_transform(monkeypatch):
    split = Split(manifest=None, split="train", kept=[0, 1, 2], per_class=None, records=records(imbalanced_labels()))
    stream = TrainStream(split, Tagged(1), 0, 1, seed=0, plain_transform=Tagged(0), plain_from_pass=2)
    passes = stream_passes(stream, 3, monkeypatch)
    assert [{t for t, _ in p} for p in passes] == [{1}, {1}, {0}]


def test_batch_mix_is_off_in_the_plain_epochs():
    calls = []

    def mix(images, labels):
        calls.append(1)
        return images, labels

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    batches = iter(lambda: (torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,))), None)
    val = [(torch.arange(4), torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,)))]
    schedule = parse_config({"name": "x", "data": {"root": "."}, "members": [{"arch": "resnet18"}]}).recipes[
        "default"].schedule
    plan = loop.FitPlan(epochs=3, steps_per_epoch=5, base_lr=0.1, schedule=schedule, plain_last_epochs=1)
    loop.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, batches, val, CPU, torch.nn.CrossEntropyLoss(),
             mix=mix)
    assert len(calls) == 10  # epochs 1-2 mixed, epoch 3 plain


def test_plain_fields_turn_strong_augmentation_off():
    strong = augment.resolve("strong", {})
    plain = augment.plain_fields(strong)
    assert plain.crop_scale == (1.0, 1.0) and plain.auto_augment == "none" and plain.mixup_alpha == 0
    assert plain.random_erasing == 0 and plain.label_smoothing == strong.label_smoothing


# --- random interpolation and multi-scale -------------------------------------------------
def test_random_interpolation_resizes_with_several_filters():
    fields = augment.AugmentFields(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, random_interpolation=True)
    tf = augment.build_train_transform(fields, 16, (0, 0, 0), (1, 1, 1))
    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    torch.manual_seed(0)
    outputs = {tf(img).numpy().tobytes() for _ in range(40)}
    assert len(outputs) == len(augment.INTERPOLATIONS)  # every filter used, nothing else changes the image
    fixed = augment.build_train_transform(augment.AugmentFields(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                                                hflip=0.0), 16, (0, 0, 0), (1, 1, 1))
    assert len({fixed(img).numpy().tobytes() for _ in range(10)}) == 1


def test_multiscale_trains_batches_at_each_listed_size():
    seen = set()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    model.register_forward_pre_hook(lambda m, inp: seen.add(inp[0].shape[-1]) if m.training else None)
    batches = iter(lambda: (torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2,))), None)
    state = loop.FitState()
    loop.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), batches, 40, lambda s: 0.01, state, CPU,
                     torch.nn.CrossEntropyLoss(), multiscale=[24, 32, 40])
    assert seen == {24, 32, 40}
    assert [loop.scale_at(s, [24, 32, 40]) for s in range(20)] == [loop.scale_at(s, [24, 32, 40]) for s in range(20)]


# --- label smoothing with a confusion prior ------------------------------------------------
def confused_predictions():
    """Class 0 is mostly confused with 2, then 3; never with 1 or 4."""
    probs = np.full((40, 5), 0.01)
    labels = np.repeat(np.arange(5), 8)
    probs[np.arange(40), labels] = 0.8
    probs[labels == 0, 2] = 0.15
    probs[labels == 0, 3] = 0.05
    return probs / probs.sum(1, keepdims=True), labels


def test_confusion_prior_spreads_mass_over_the_most_confused_classes():
    probs, labels = confused_predictions()
    prior = confusion_prior(probs, labels, k=2)
    assert np.allclose(prior.sum(1), 1)
    assert set(np.flatnonzero(prior[0])) == {2, 3} and prior[0, 2] > prior[0, 3]
    assert np.all(np.diag(prior) == 0)
    s = smoothing_matrix(prior, eps=0.1).numpy()
    assert s[0, 0] == pytest.approx(0.9) and s[0, 2] + s[0, 3] == pytest.approx(0.1)
    assert s[0, 1] == s[0, 4] == 0  # uniform smoothing would give them 0.025 each


def test_prior_smoothing_loss_is_cross_entropy_against_the_smoothed_targets():
    probs, labels = confused_predictions()
    s = smoothing_matrix(confusion_prior(probs, labels, k=2), eps=0.2)
    loss = PriorSmoothingLoss(s)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    manual = -(s[y] * logits.log_softmax(1)).sum(1).mean()
    assert loss(logits, y) == pytest.approx(float(manual))
    soft = torch.nn.functional.one_hot(y, 5).float() * 0.5 + torch.nn.functional.one_hot(y.roll(1), 5).float() * 0.5
    assert torch.allclose(loss.targets(soft), 0.5 * s[y] + 0.5 * s[y.roll(1)])


# --- CAM-guided crops ---------------------------------------------------------------------
def test_sampled_crop_centres_follow_the_map():
    cam = torch.tensor([[8.0, 1.0, 0.0, 1.0], [2.0, 4.0, 1.0, 0.0], [0.0, 1.0, 6.0, 1.0], [1.0, 0.0, 2.0, 4.0]])
    cam = cam / cam.sum()
    n = 20000
    centres = sample_centres(cam, n, height=64, width=96, generator=torch.Generator().manual_seed(0))
    assert centres[:, 0].min() >= 0 and centres[:, 0].max() < 96 and centres[:, 1].max() < 64
    cells = (centres[:, 1] // 16).long() * 4 + (centres[:, 0] // 24).long()
    observed = np.bincount(cells.numpy(), minlength=16)
    expected = cam.flatten().numpy() * n
    nonzero = expected > 0
    assert observed[~nonzero].sum() == 0  # never where the map is zero
    assert stats.chisquare(observed[nonzero], expected[nonzero]).pvalue > 1e-3


def test_cam_guided_crops_keep_the_object():
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, :16, :16] = 255  # the "object": the top-left corner
    cam = torch.zeros(8, 8)
    cam[:2, :2] = 0.25
    guided = CamGuidedCrop(16, (0.05, 0.1), (1.0, 1.0), {"a": cam})
    plain = augment.v2.RandomResizedCrop(16, scale=(0.05, 0.1), ratio=(1.0, 1.0), antialias=True)
    torch.manual_seed(0)
    hit_guided = np.mean([guided(img, "a").float().mean() > 100 for _ in range(200)])
    hit_plain = np.mean([plain(img).float().mean() > 100 for _ in range(200)])
    assert hit_guided > 0.9 and hit_plain < 0.3


def test_class_activation_map_is_the_classifier_row_over_the_last_features():
    model = build_model("resnet18", num_classes=4, low_res=True).eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    maps = class_activation_maps(model, images, labels)
    feats = {}
    model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    model(images)
    manual = torch.einsum("bkhw,bk->bhw", feats["f"], model.fc.weight[labels]).clamp(min=0)
    manual = manual / manual.flatten(1).sum(1).view(-1, 1, 1)
    assert maps.shape == (2, 4, 4) and torch.allclose(maps, manual, atol=1e-5)
    with pytest.raises(UserError, match="global-average-pool|pooled"):
        class_activation_maps(build_model("vgg11_bn", num_classes=4, low_res=True), images, labels)


# --- config and end to end ---------------------------------------------------------------
def recipe_config(root: str, **recipe) -> dict:
    return {"name": "hik", "data": {"root": root, "classes": 3, "train_per_class": 6, "val_per_class": 4},
            "recipes": {"r": {"epochs": 2, "batch_size": 6, "augment": {"preset": "light"}, **recipe}},
            "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32, "resources": {"loader_workers": 0}}]}


def test_recipe_options_are_checked_when_the_config_loads(tiny_root):
    teacher = {"teacher": {"runs": "runs.yaml", "member": "m"}}
    with pytest.raises(UserError, match="label_smoothing > 0"):
        parse_config(recipe_config(tiny_root, confusion_prior=teacher))
    with pytest.raises(UserError, match="plain_last_epochs"):
        parse_config(recipe_config(tiny_root, plain_last_epochs=3))
    with pytest.raises(UserError, match="unknown config key"):
        parse_config(recipe_config(tiny_root, cam_crops={**teacher, "centre": "map"}))


def train_teacher(tiny_root, tmp_path):
    """A teacher trained by the platform (3 classes, a minival of 2 per class held out),
    recorded in a runs file with its checkpoint and its val and minival predictions."""
    from orchestrator.train.member import final_outputs

    cfg = parse_config({**recipe_config(tiny_root, epochs=4, optimizer={"name": "sgd", "lr": 0.5},
                                        augment={"preset": "none"}),
                        "data": {"root": tiny_root, "classes": 3, "train_per_class": 12, "val_per_class": 4,
                                 "minival": 4}})
    member, data = resolve_members(cfg)[0], open_member_data(cfg.data)
    files = {}

    def keep(state, metrics, model, optimizer, probs):
        if probs is not None:
            files.update(final_outputs(probs, lambda p: [p], model, member, data, metrics, CPU))
    model, _ = train_member(member, data, device=CPU, on_epoch_end=keep)
    save_checkpoint(str(tmp_path / "t.pt"), arch="resnet18", num_classes=3, low_res=True, model=model)
    for name, array in files.items():
        np.save(tmp_path / name, array)
    ref = dict(name="tiny", uri=tiny_root, num_classes=3, class_names=data.train.class_names)
    write_runs(str(tmp_path / "runs.yaml"), RunsFile(
        ensemble="t", dataset=DatasetRef(**ref, labels=str(tmp_path / "labels.npy")),
        minival=DatasetRef(**ref, split=data.minival.split, labels=str(tmp_path / "minival_labels.npy")),
        members=[MemberRecord(name="teacher", key="t", arch="resnet18", checkpoint=str(tmp_path / "t.pt"),
                              predictions=str(tmp_path / "predictions.npy"),
                              minival_predictions=str(tmp_path / "minival_predictions.npy"),
                              eval=EvalRef(input_size=32, resize=32, crop=32, mean=[0.485, 0.456, 0.406],
                                           std=[0.229, 0.224, 0.225]))]))
    return {"runs": str(tmp_path / "runs.yaml"), "member": "teacher"}, files


def test_a_member_trains_with_every_option_from_a_trained_teacher(tiny_root, tmp_path, monkeypatch):
    from orchestrator.train import teacher as teachers
    from orchestrator.train.cam import sample_centres

    teacher, files = train_teacher(tiny_root, tmp_path)
    eps = 0.1
    cfg = parse_config(recipe_config(
        tiny_root, label_shuffling=True, cam_crops={"teacher": teacher, "probability": 0.8},
        confusion_prior={"teacher": teacher, "k": 1}, plain_last_epochs=1, multiscale=[24, 32],
        augment={"preset": "light", "overrides": {"label_smoothing": eps, "random_interpolation": True}}))
    member = resolve_members(cfg)[0]
    data = open_member_data(cfg.data)

    # the confusion prior's targets: the mass goes to the one class the trained teacher confuses
    # most with the truth, measured on its minival (not val), where uniform smoothing spreads it
    S = teachers.load_confusion_smoothing(member.recipe, data.train.class_names).numpy()
    want = confusion_prior(files["minival_predictions.npy"], files["minival_labels.npy"], k=1)
    assert np.allclose(S, smoothing_matrix(want, eps).numpy())
    for y in range(3):
        off = np.delete(S[y], y)
        assert sorted(off.tolist()) == pytest.approx([0.0, eps])  # one class gets it all, not eps / 3 each
    uniform = (1 - eps) * np.eye(3) + eps / 3
    assert not np.allclose(S, uniform, atol=1e-3)

    # the CAM crops' centres: drawn where the teacher's map of the true class is high, so
    # the map's mass at the guided centres exceeds its mass at uniform (plain-crop) centres
    maps = teachers.load_cam_maps(member.recipe, data.train, CPU)
    assert set(maps) == {s.key for s in data.train.records}
    # computed once, stored beside the teacher's weights as one float16 array, memory-mapped;
    # a second load (a resume, another member) reads it instead of running the teacher again
    assert maps.maps.dtype == np.float16 and maps.maps.shape[0] == len(data.train.records)
    assert isinstance(maps.maps, np.memmap) and "/cam/" in maps.folder
    monkeypatch.setattr(teachers, "_build_cam_maps", lambda *a: pytest.fail("CAM maps computed twice"))
    again = teachers.load_cam_maps(member.recipe, data.train, CPU)
    key = data.train.records[5].key
    assert torch.equal(again.get(key), maps.get(key)) and again.get("no-such-key") is None
    gain = []
    gen = torch.Generator().manual_seed(0)
    for cam in list(maps.values())[:12]:
        cam = cam.float()
        h, w = cam.shape
        guided = sample_centres(cam, 400, h, w, generator=gen).long()
        plain = (torch.rand(400, 2, generator=gen) * torch.tensor([w, h])).long()
        gain.append(float(cam[guided[:, 1], guided[:, 0]].mean() - cam[plain[:, 1], plain[:, 0]].mean()))
    assert np.mean(gain) > 0 and sum(g > 0 for g in gain) >= 10

    seen, notes = [], {}
    train_member(member, data, device=CPU, on_epoch_end=lambda s, m, *_: seen.append(m), on_notes=notes.update)
    assert [m["epoch"] for m in seen] == [1, 2] and all(np.isfinite(m["train_loss"]) for m in seen)
    # each option says what it did (printed, and set as tags on the member's run)
    assert notes["hikvision.label_shuffling"].startswith("label-shuffled epoch: 3 classes x 6 = 18 samples")
    assert notes["hikvision.cam_crops"].startswith("CAM maps from teacher teacher: 18 images in ")
    assert "top-1 confused classes" in notes["hikvision.confusion_prior"]
    assert notes["hikvision.plain_last_epochs"] == "strong augmentation off for the last 1 epochs"
    bad = parse_config(recipe_config(tiny_root, cam_crops={"teacher": {**teacher, "member": "nobody"}}))
    with pytest.raises(UserError, match="nobody"):
        train_member(resolve_members(bad)[0], data, device=CPU)


def test_cam_maps_of_a_remote_teacher_are_fetched_once_per_machine(tmp_path):
    """Stored beside a remote teacher (here fsspec's in-memory filesystem standing in for
    S3), the three files come down into the local cache, complete or not at all."""
    from orchestrator.train import teacher as teachers
    from orchestrator.train.cam import CamMaps

    built = tmp_path / "built"
    built.mkdir()
    np.save(built / "keys.npy", np.array([b"a", b"b"], dtype="S"))
    np.save(built / "rows.npy", np.array([1, 0]))
    np.save(built / "maps.npy", np.arange(8, dtype=np.float16).reshape(2, 2, 2))
    stored = "memory://teachers/t/cam/abc"
    assert not teachers._fetch(stored, str(tmp_path / "cache"))  # nothing stored yet
    teachers._upload(str(built), stored)
    assert teachers._fetch(stored, str(tmp_path / "cache"))
    maps = CamMaps(str(tmp_path / "cache"))
    assert maps.get("a").tolist() == [[4.0, 5.0], [6.0, 7.0]] and maps.get("b").tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert sorted(maps) == ["a", "b"] and not list((tmp_path / "cache").glob("*.partial"))
