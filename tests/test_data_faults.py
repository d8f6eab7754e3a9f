"""Bad data is refused or counted, never silently trained on: corrupt or truncated JPEGs
(skipped, counted per epoch, fail past data.max_bad_images), a shard whose sha256 differs
from the manifest's, a truncated shard, labels outside the class range."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from orchestrator.config import parse_config, resolve_members
from orchestrator.data.dataset import TooManyBadImages, open_split
from orchestrator.data.streams import EvalStream, TrainStream
from orchestrator.data.prepare import _write_shard
from orchestrator.base.errors import UserError
from orchestrator.train.member import open_member_data, train_member

CPU = torch.device("cpu")


def make_dataset(root, tiny_root, corrupt=(), labels=None, per_class: int = 4, classes: int = 3):
    """A 3-class shard set from real Tiny-ImageNet JPEGs; `corrupt` sample positions get
    truncated JPEG bytes, `labels` overrides labels."""
    src = open_split(tiny_root, "val", classes=classes, per_class=per_class)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"name": "faulty", "num_classes": classes,
                "classes": [{"index": i, "wnid": w, "name": w} for i, w in enumerate(src.class_names)], "splits": {}}
    for split in ("train", "val"):
        items = []
        for i, s in enumerate(src.records):
            data = s.data[: len(s.data) // 3] if i in corrupt else s.data
            items.append((f"{split}_{i}", data, labels[i] if labels else s.label))
        info = _write_shard(str(root / f"{split}-0000.tar.gz"), items)
        manifest["splits"][split] = {"samples": len(items), "shards": [{"file": f"{split}-0000.tar.gz", **info}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_corrupt_jpegs_are_skipped_in_training_and_counted(tmp_path, tiny_root):
    root = make_dataset(tmp_path / "d", tiny_root, corrupt={1, 5})
    split = open_split(root, "train")
    stream = TrainStream(split, lambda img: img[:, :8, :8], 0, 1, seed=0)
    it = iter(stream)
    got = [next(it) for _ in range(10)]  # one pass holds 12 - 2 decodable images
    assert len(got) == 10 and stream.bad.total == 2
    val = EvalStream(open_split(root, "val"), lambda img: img[:, :8, :8])
    idx = [int(i) for batch, _, _ in DataLoader(val, batch_size=4) for i in batch]
    assert sorted(idx) == list(range(12)) and val.bad.total == 2  # scored blank, rows kept


def config(root: str, limit: int):
    return parse_config({"name": "faults", "data": {"root": root, "max_bad_images": limit},
                         "recipes": {"r": {"epochs": 1, "batch_size": 4, "augment": {"preset": "none"}}},
                         "members": [{"arch": "vgg11_bn", "recipe": "r", "input_size": 32,
                                      "resources": {"loader_workers": 0}}]})


@pytest.mark.parametrize("limit, fails", [(1, True), (8, False)])
def test_bad_images_past_the_limit_fail_the_member(tmp_path, tiny_root, limit, fails):
    root = make_dataset(tmp_path / "d", tiny_root, corrupt={0, 3, 7})
    cfg = config(root, limit)
    member, data = resolve_members(cfg)[0], open_member_data(cfg.data)
    seen = []
    if fails:
        with pytest.raises(TooManyBadImages, match="more than data.max_bad_images = 1"):
            train_member(member, data, device=CPU)
        return
    train_member(member, data, device=CPU, on_epoch_end=lambda s, m, *_: seen.append(m))
    # an epoch is a number of steps: with 3 of 12 images skipped it reads into the next pass
    assert seen[0]["val_bad_images"] == 3 and 3 <= seen[0]["bad_images"] <= 6


def test_a_shard_that_differs_from_its_sha256_is_refused(tmp_path, tiny_root):
    root = make_dataset(tmp_path / "d", tiny_root)
    other = make_dataset(tmp_path / "e", tiny_root, corrupt={2})
    (tmp_path / "d" / "val-0000.tar.gz").write_bytes((tmp_path / "e" / "val-0000.tar.gz").read_bytes())
    with pytest.raises(UserError, match="sha256 differs from the manifest"):
        list(open_split(root, "val").iter_samples())
    assert len(list(open_split(other, "val").iter_samples())) == 12  # an intact one reads fine


def test_a_truncated_shard_fails_with_one_line(tmp_path, tiny_root):
    root = make_dataset(tmp_path / "d", tiny_root)
    shard = tmp_path / "d" / "val-0000.tar.gz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        list(open_split(root, "val").iter_samples())
    assert "\n" not in str(err.value)


def test_labels_outside_the_class_range_are_refused(tmp_path, tiny_root):
    labels = [0, 1, 2, 7, 0, 1, 2, 0, 1, 2, 0, 1]
    root = make_dataset(tmp_path / "d", tiny_root, labels=labels)
    with pytest.raises(UserError, match="has label 7, outside 0..2"):
        list(open_split(root, "val").iter_samples())


def test_an_empty_class_is_refused(tmp_path, tiny_root):
    labels = [0, 1, 0, 1] * 3  # class 2 has no samples
    root = make_dataset(tmp_path / "d", tiny_root, labels=labels)
    with pytest.raises(UserError, match="no samples of class"):
        open_split(root, "val", per_class=2)
    assert np.unique([s.label for s in open_split(root, "val").iter_samples()]).tolist() == [0, 1]


def test_storage_retries_transient_failures_only(monkeypatch):
    import errno

    from orchestrator.base import storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("connection refused")
        return "ok"
    assert storage.retry(flaky, "test", seconds=60) == "ok" and len(calls) == 4
    for permanent in (FileNotFoundError("gone"), PermissionError("no"), OSError(errno.ENOSPC, "disk full")):
        calls.clear()

        def fails(exc=permanent):
            calls.append(1)
            raise exc
        with pytest.raises(type(permanent)):
            storage.retry(fails, "test", seconds=60)
        assert len(calls) == 1  # not retried
    with pytest.raises(ConnectionError):  # a budget that runs out re-raises
        storage.retry(lambda: (_ for _ in ()).throw(ConnectionError("down")), "test", seconds=3)


def test_a_full_disk_is_a_clear_error_before_training(tmp_path, monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileSystem

    from orchestrator.base import storage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(LocalFileSystem, "open", full)
    with pytest.raises(UserError, match="storage path .* is not writable: OSError: .*No space left on device"):
        storage.check_writable(str(tmp_path / "out"))
