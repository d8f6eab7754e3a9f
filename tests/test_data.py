"""The data path on the real Tiny-ImageNet shards: subsets, RGB, disjoint parts, prepare."""
import collections
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image

from orchestrator.data import prepare
from orchestrator.data.dataset import decode_rgb, open_split
from orchestrator.data.streams import EvalStream, TrainStream
from orchestrator.data.sources import iter_shard
from orchestrator.data.split_ref import SplitRef
from orchestrator.base.errors import UserError

identity = lambda img: img  # noqa: E731


@pytest.fixture(scope="module")
def val_subset(tiny_root):
    return open_split(tiny_root, "val", classes=6, per_class=5)


def test_subset_by_classes_and_per_class_count(val_subset):
    counts = collections.Counter(s.label for s in val_subset.records)
    assert val_subset.num_classes == 6 and counts == {i: 5 for i in range(6)}
    assert val_subset.class_names[0] == "n01443537"  # sorted-wnid order of the manifest


def test_subset_by_wnids_remaps_labels(tiny_root):
    split = open_split(tiny_root, "val", classes=["n01774750", "n01443537"], per_class=2)
    assert split.class_names == ["n01774750", "n01443537"]
    assert sorted(s.label for s in split.records) == [0, 0, 1, 1]


def test_greyscale_images_are_decoded_as_rgb(tiny_root):
    for sample in iter_shard(os.path.join(tiny_root, "val-0001.tar.gz")):
        raw = decode_image(torch.frombuffer(bytearray(sample.data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        if raw.shape[0] == 1:
            rgb = decode_rgb(sample.data)
            assert rgb.shape == (3, *raw.shape[1:]) and torch.equal(rgb[0], rgb[1])
            return
    pytest.fail("no greyscale image found in val-0001")


@pytest.mark.parametrize("world, loader_workers", [(1, 0), (2, 0), (3, 2)])
def test_validation_scores_every_sample_exactly_once(val_subset, world, loader_workers):
    seen = []
    for rank in range(world):
        loader = DataLoader(EvalStream(val_subset, lambda img: img[:, :4, :4], rank, world), batch_size=4,
                            num_workers=loader_workers)
        seen += [int(i) for idx, _, _ in loader for i in idx]
    assert sorted(seen) == list(range(len(val_subset)))


def test_training_parts_are_disjoint_equal_and_reshuffled(val_subset):
    world = 2
    parts = []
    for rank in range(world):
        stream = iter(TrainStream(val_subset, identity, rank, world, seed=0))
        parts.append([next(stream)[0].sum().item() for _ in range(len(val_subset) // world)])
    assert len(parts[0]) == len(parts[1]) == 15
    first = iter(TrainStream(val_subset, identity, 0, 1, seed=0))
    epoch1 = [next(first)[1] for _ in range(30)]
    epoch2 = [next(first)[1] for _ in range(30)]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # same samples, new order each pass
    keys = [set(), set()]
    for rank in range(world):
        s = TrainStream(val_subset, identity, rank, world, seed=0)
        order = list(s._one_pass(0, 0, 1))
        keys[rank] = {x.key for x in order}
    assert not keys[0] & keys[1]


def test_streaming_mode_reads_whole_split_without_holding_it(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet-sample-1k-160")
    split = open_split(os.environ.get("DATA_1K", root), "val")
    assert split.records is None and len(split) == 1000 and split.num_classes == 1000
    seen = [int(i) for rank in range(2) for idx, _, _ in DataLoader(
        EvalStream(split, lambda img: img[:, :8, :8], rank, 2), batch_size=50) for i in idx]
    assert sorted(seen) == list(range(1000))


def test_missing_shard_and_class_mismatch_fail_with_one_line(tiny_root, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    shutil.copy(os.path.join(tiny_root, "manifest.json"), root)
    with pytest.raises(UserError, match="shard .*val-0000.tar.gz named in the manifest is missing"):
        open_split(str(root), "val")
    with pytest.raises(UserError, match="data.num_classes is 100 but .* lists 200"):
        open_split(tiny_root, "val", num_classes=100)
    with pytest.raises(UserError, match="has no split 'test'; valid choices: train, val"):
        open_split(tiny_root, "test")
    with pytest.raises(UserError, match="class 'n00000000' is not in tiny-imagenet-200"):
        open_split(tiny_root, "val", classes=["n00000000"])


def _make_folder(tmp_path, val_subset, flat_val: bool):
    src = tmp_path / "ilsvrc"
    wnids = val_subset.class_names[:3]
    lines = []
    for i, s in enumerate(val_subset.records):
        if s.label >= 3:
            continue
        d = src / "train" / wnids[s.label]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i}.JPEG").write_bytes(s.data)
        if flat_val:
            (src / "val").mkdir(exist_ok=True)
            (src / "val" / f"v{i}.JPEG").write_bytes(s.data)
            lines.append(f"v{i}.JPEG {wnids[s.label]}")
        else:
            (src / "val" / wnids[s.label]).mkdir(parents=True, exist_ok=True)
            (src / "val" / wnids[s.label] / f"v{i}.JPEG").write_bytes(s.data)
    if flat_val:
        (src / "val" / "labels.txt").write_text("\n".join(lines))
    return src


@pytest.mark.parametrize("flat_val", [False, True])
def test_prepare_turns_a_folder_layout_into_readable_shards(tmp_path, val_subset, flat_val):
    src = _make_folder(tmp_path, val_subset, flat_val)
    dst = tmp_path / "shards"
    assert prepare.main([str(src), str(dst), "--shard-samples", "4"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["splits"]["train"]["samples"] == 15
    assert len(manifest["splits"]["train"]["shards"]) == 4  # 15 samples, 4 per shard
    val = open_split(str(dst), "val")
    labels = sorted(s.label for s in val.iter_samples())
    assert labels == sorted([s.label for s in val_subset.records if s.label < 3])
    original = {s.data for s in val_subset.records}
    assert all(s.data in original for s in val.iter_samples())  # JPEG bytes copied unchanged
    # each split's labels written once, in dataset order: read without a pass over the images
    assert manifest["splits"]["val"]["labels"]["file"] == "val-labels.npy"
    assert val.manifest.split_labels("val").tolist() == [s.label for s in val.iter_samples()]


def test_shards_are_plain_webdataset_shards(tmp_path, val_subset, tiny_root):
    """What `prepare` writes and the shared shards both read with the webdataset library as
    they read here: a user can open the platform's data with the standard tools."""
    import webdataset as wds

    dst = tmp_path / "shards"
    prepare.main([str(_make_folder(tmp_path, val_subset, False)), str(dst), "--shard-samples", "4"])
    for shard in (dst / "val-0000.tar.gz", os.path.join(tiny_root, "val-0001.tar.gz")):
        ours = [(s.key, s.data, s.label) for s in iter_shard(str(shard))]
        theirs = [(d["__key__"], d["jpg"], int(d["cls"])) for d in wds.WebDataset(str(shard), shardshuffle=False)]
        assert ours == theirs and len(ours) > 0


def test_prepare_bad_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare.main([str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "has neither manifest.json nor a train/<wnid>/ folder layout" in capsys.readouterr().err


def test_predictions_labels_match_dataset_order(val_subset):
    from orchestrator.train.member import split_labels

    assert np.array_equal(split_labels(val_subset), [s.label for s in val_subset.records])


@pytest.mark.parametrize("flat_val", [False, True])
def test_an_imagefolder_layout_is_read_in_place(tmp_path, val_subset, flat_val):
    """train/<wnid>/*.JPEG and val as folders or with a labels file, without `prepare`."""
    src = _make_folder(tmp_path, val_subset, flat_val)
    train = open_split(str(src), "train")
    assert train.records is None and len(train) == 15 and train.num_classes == 3
    assert sorted(s.label for s in train.iter_samples()) == sorted(s.label for s in val_subset.records if s.label < 3)
    val = open_split(str(src), "val", per_class=2)
    assert collections.Counter(s.label for s in val.records) == {0: 2, 1: 2, 2: 2}
    whole_val = open_split(str(src), "val")
    seen = [int(i) for rank in range(2) for idx, _, _ in DataLoader(
        EvalStream(whole_val, lambda img: img[:, :4, :4], rank, 2), batch_size=4, num_workers=2) for i in idx]
    assert sorted(seen) == list(range(15))
    stream = iter(TrainStream(train, identity, 1, 2, seed=0))
    assert all(next(stream)[0].shape[0] == 3 for _ in range(7))


def test_a_split_name_is_read_once_into_a_typed_value():
    ref = SplitRef.parse("train@rest:10:0@share:1:4")  # a share of the rest of train after its minival
    assert ref == SplitRef("train", "rest", 10, 0, (1, 4)) and str(ref) == "train@rest:10:0@share:1:4"
    assert ref.describe_share() == "2 of 4" and SplitRef("val").describe_share() is None
    minival, rest = SplitRef("train").carved(2, 5)
    assert str(minival) == "train@minival:2:5" and SplitRef.parse(str(rest)) == rest
    assert str(rest.share_of(0, 3)) == "train@rest:2:5@share:0:3"
    with pytest.raises(UserError, match=r"'train@minival:x' is not a split name \(valid: <split>"):
        SplitRef.parse("train@minival:x")
