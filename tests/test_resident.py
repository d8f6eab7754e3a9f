"""The resident data mode (`data.resident`, orchestrator/data/resident.py): a split decoded
once and trained from by index. It visits the samples the streaming path visits, gives
the same tensor per index with augmentation off, balances classes under label shuffling,
and makes training reproducible bit for bit on CPU, across a kill and resume too."""
import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch

from orchestrator.config import parse_config, resolve_members
from orchestrator.data import resident
from orchestrator.data.dataset import decode_rgb, open_split
from orchestrator.data.prepare import _write_shard
from orchestrator.data.streams import TrainStream
from orchestrator.base.errors import UserError
from orchestrator.train import augment, batch_augment
from orchestrator.train.member import open_member_data, predict, train_member
from orchestrator.train.pass_batches import loader_batches
from orchestrator.train.resident_batches import ResidentBatches, pass_rows

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def keys_of_pass(stream: TrainStream, p: int) -> list[str]:
    return [s.key for s in stream._one_pass(p, 0, 1)]


def test_a_resident_pass_is_the_streaming_pass_of_a_split_in_memory(tiny_root):
    split = open_split(tiny_root, "train", classes=6, per_class=15)
    held = resident.load(split, CPU)
    assert held.images.shape == (90, 3, 64, 64) and held.images.dtype == torch.uint8
    for shuffled in (False, True):
        stream = TrainStream(split, None, 0, 1, seed=7, label_shuffling=shuffled)
        for p in (0, 3):
            rows = pass_rows(held, split, 7, p, 0, 1, shuffled)
            assert [split.records[held.positions[i]].key for i in rows] == keys_of_pass(stream, p)


def sharded(tmp_path, tiny_root) -> str:
    """33 real images of 4 classes (12, 9, 7 and 5 of them) in 5 shards of 7 or fewer."""
    src = open_split(tiny_root, "val", classes=4, per_class=12)
    want, items = [12, 9, 7, 5], []
    for s in src.records:
        if want[s.label]:
            want[s.label] -= 1
            items.append((s.key, s.data, s.label))
    order = np.random.default_rng(0).permutation(len(items))
    items = [items[i] for i in order]
    manifest = {"name": "uneven", "num_classes": 4, "splits": {},
                "classes": [{"index": i, "wnid": w, "name": w} for i, w in enumerate(src.class_names)]}
    shards = []
    for k in range(5):
        info = _write_shard(str(tmp_path / f"train-{k:04d}.tar.gz"), items[7 * k:7 * k + 7])
        shards.append({"file": f"train-{k:04d}.tar.gz", **info})
    manifest["splits"]["train"] = {"samples": len(items), "shards": shards}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return str(tmp_path)


class Unchanged:
    """A batch pipeline that leaves the uint8 images as they are, so a test sees which they are."""

    def augment(self, images):
        return images


def epochs_of(batches, steps: int, epochs: int, position_of: dict) -> list[list[int]]:
    """The positions each epoch of `steps` batches trains on."""
    it = iter(batches)
    return [[position_of[img.numpy().tobytes()] for _ in range(steps) for img in next(it)[0]] for _ in range(epochs)]


@pytest.mark.parametrize("shuffled", [False, True])
def test_a_resident_pass_and_a_streamed_pass_visit_the_same_samples_every_epoch(tmp_path, tiny_root, shuffled):
    """Streamed through two loader processes per rank, or held decoded: every epoch is one
    whole pass and both modes train on the same samples in it, over one rank or two; label
    shuffling draws every class exactly N times a pass at a batch (5) that divides
    neither C x N (48) nor n (33), over either world size."""
    split = open_split(sharded(tmp_path, tiny_root), "train")
    assert split.records is None and len(split.urls()) == 5
    held = resident.load(split, CPU)
    position_of = {held.images[i].numpy().tobytes(): int(held.positions[i]) for i in range(len(held))}
    labels = held.position_labels
    total = 48 if shuffled else 33
    for world in (1, 2):
        streamed, kept = [[] for _ in range(3)], [[] for _ in range(3)]
        for rank in range(world):
            stream = TrainStream(split, lambda img: img, rank, world, seed=3, label_shuffling=shuffled, batch_size=5)
            batches = ResidentBatches(held, split, Unchanged(), batch_size=5, seed=3, rank=rank, world=world,
                                      label_shuffling=shuffled)
            assert stream.steps == batches.steps == -(-total // world // 5)  # a whole pass, every rank alike
            for e, got in enumerate(epochs_of(loader_batches(stream, 2, CPU), stream.steps, 3, position_of)):
                streamed[e] += got
            for e, got in enumerate(epochs_of(batches, batches.steps, 3, position_of)):
                kept[e] += got
        for e in range(3):
            assert Counter(streamed[e]) == Counter(kept[e]) and len(kept[e]) == total, (world, e)
            if shuffled:
                assert np.bincount(labels[kept[e]], minlength=4).tolist() == [12] * 4, (world, e)
            elif world == 1:
                assert sorted(kept[e]) == list(range(33))
            else:  # shards of 19 and 14 samples make parts of 17 and 16: a rank drops or repeats a few
                assert max(Counter(kept[e]).values()) <= 2
        assert Counter(kept[0]) != Counter(kept[1]) or not shuffled  # drawn anew each pass


STAGING = """
import sys, threading, time, torch
from orchestrator.data import resident
from orchestrator.data.dataset import open_split

resident.CHUNK_BYTES = 4 * 2**20
split = open_split(sys.argv[1], "train", classes=80, per_class=100)  # 8,000 images of 64 px: 94 MiB as uint8
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before, peak, done = rss(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
held = resident.load(split, torch.device("meta"))  # a device whose memory is not the host's
done.set()
print(len(held), peak[0] - before)
"""


def test_a_resident_split_is_staged_on_the_host_one_chunk_at_a_time(tiny_root):
    """Building the array for a device (here `meta`, which keeps nothing) holds one chunk
    of decoded images in host memory, not the whole split."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", STAGING, tiny_root], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    images, grown = map(int, out.stdout.split())
    whole = images * 3 * 64 * 64
    assert images == 8000 and grown < whole / 3, f"host grew {grown / 2**20:.0f} MiB for a {whole / 2**20:.0f} MiB split"


def test_with_augmentation_off_a_batch_is_the_per_image_tensor(tiny_root):
    split = open_split(tiny_root, "train", classes=3, per_class=8)
    held = resident.load(split, CPU)
    fields = augment.resolve("none", {})  # whole-image crop, no flip, no colour
    batches = ResidentBatches(held, split, batch_augment.BatchAugment(fields, 64, MEAN, STD, CPU), batch_size=6,
                              seed=0)
    order = pass_rows(held, split, 0, 0, 0, 1, False)
    assert batches.steps == 4
    per_image = augment.build_eval_transform(64, 64, MEAN, STD)
    it = iter(batches)
    for k in range(4):
        x, y = next(it)
        idx = order[6 * k:6 * k + 6]
        expected = torch.stack([per_image(decode_rgb(split.records[i].data)) for i in idx])
        assert torch.equal(y, held.labels[idx])
        assert torch.allclose(x, expected, atol=1e-5)


def test_label_shuffled_resident_passes_draw_every_class_n_times_over_the_ranks(tiny_root):
    split = open_split(tiny_root, "train", classes=5, per_class=20)
    keep = [i for i, s in enumerate(split.records) if s.label != 2 or i % 3 == 0]  # class 2 smaller
    split.records = [split.records[i] for i in keep]
    held = resident.load(split, CPU)
    counts = np.bincount(held.labels.numpy())
    n = counts.max()
    for p in (0, 1):
        parts = [pass_rows(held, split, 4, p, r, 2, True) for r in range(2)]
        assert abs(len(parts[0]) - len(parts[1])) <= 1 and len(parts[0]) + len(parts[1]) == 5 * n
        drawn = np.bincount(held.labels.numpy()[np.concatenate(parts)], minlength=5)
        assert (drawn == n).all()  # exactly N per class over the ranks: no draw dropped


def config(tiny_root, resident_mode="auto", epochs=3, **recipe):
    return parse_config({
        "name": "repro", "data": {"root": tiny_root, "classes": 4, "train_per_class": 12, "val_per_class": 4,
                                  "resident": resident_mode},
        "recipes": {"r": {"epochs": epochs, "batch_size": 8,
                          "optimizer": {"name": "sgd", "lr": 0.4},
                          "augment": {"preset": "light", "overrides": {"mixup_alpha": 0.2}}, **recipe}},
        "defaults": {"input_size": 32, "resources": {"loader_workers": 0}},
        "members": [{"arch": "vgg8", "recipe": "r", "seed": 5}]})


class Killed(Exception):
    pass


def trained(cfg, kill_after: int | None = None, resume: dict | None = None):
    """(predictions on val, the state saved at each epoch end); raises Killed after epoch `kill_after`."""
    member = resolve_members(cfg)[0]
    data = open_member_data(cfg.data)
    saved = {}
    notes = {}

    def on_epoch_end(state, metrics, model, optimizer, probs):
        saved[state.epoch] = {"state_dict": copy.deepcopy(model.state_dict()),
                              "optimizer": copy.deepcopy(optimizer.state_dict()), "epoch": state.epoch,
                              "step": state.step, "history": list(state.history)}
        if state.epoch == kill_after:
            raise Killed(saved[state.epoch])

    model, _ = train_member(member, data, device=CPU, resume=resume, on_epoch_end=on_epoch_end, on_notes=notes.update)
    rows = predict(model, data.val, member, CPU)
    return np.stack([rows[i].numpy() for i in sorted(rows)]), notes


def test_resident_training_is_bitwise_reproducible_across_a_kill_and_resume(tiny_root):
    cfg = config(tiny_root)
    first, notes = trained(cfg)
    assert notes["data.placement"].startswith("resident on cpu (48 images of 64x64 px")
    second, _ = trained(cfg)
    assert np.array_equal(first, second)  # two runs: the same bits
    with pytest.raises(Killed) as killed:
        trained(cfg, kill_after=1)
    resumed, _ = trained(cfg, resume=killed.value.args[0])
    assert np.array_equal(first, resumed)  # killed after epoch 1, resumed from its checkpoint


def test_streamed_training_is_bitwise_reproducible(tiny_root):
    cfg = config(tiny_root, resident_mode=False, epochs=2)
    first, notes = trained(cfg)
    assert notes["data.placement"] == "streamed (data.resident: false)"
    assert np.array_equal(first, trained(cfg)[0])


def test_resident_true_is_refused_for_augmentations_without_a_batch_form(tiny_root):
    cfg = config(tiny_root, resident_mode=True, augment={"preset": "light", "overrides": {"random_erasing": 0.2}})
    with pytest.raises(UserError, match="data.resident: true needs augmentations with a batch form; random_erasing"):
        trained(cfg)
    auto, notes = trained(config(tiny_root, epochs=1, augment={"preset": "light",
                                                                "overrides": {"random_erasing": 0.2}}))
    assert notes["data.placement"] == "streamed (an augmentation has no batch form)"


def test_a_capped_epoch_opens_only_the_shards_its_draws_are_in(tmp_path, tiny_root, monkeypatch):
    """`max_steps_per_epoch` below a pass: each epoch is the first k x batch draws of its
    pass in reading order, the same in both modes, and a streamed rank reads no other shard."""
    from orchestrator.data import dataset

    split = open_split(sharded(tmp_path, tiny_root), "train")
    held = resident.load(split, CPU)
    position_of = {held.images[i].numpy().tobytes(): int(held.positions[i]) for i in range(len(held))}
    opened = []
    real = dataset.iter_shard
    monkeypatch.setattr(dataset, "iter_shard", lambda url, *a: opened.append(url) or real(url, *a))
    stream = TrainStream(split, lambda img: img, 0, 1, seed=3, batch_size=4, max_steps=2)
    batches = ResidentBatches(held, split, Unchanged(), batch_size=4, seed=3, max_steps=2)
    assert stream.steps == batches.steps == 2
    for p in range(3):
        opened.clear()
        streamed = [position_of[img.numpy().tobytes()] for img, _ in stream.items(p, 0, 1)]
        assert len(streamed) == 8 and len(opened) == 2  # 8 draws: the first shard of 7 and one of the next
        assert Counter(streamed) == Counter(held.positions[batches.rows(p)].tolist())
