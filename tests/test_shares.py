"""data.shares: train (less its minival) dealt into disjoint per-class shares, member i on
share i mod K, the same whether train is held in memory or streamed."""
import numpy as np
import pytest
import torch

from orchestrator.config import parse_config, resolve_members
from orchestrator.data import shares
from orchestrator.data.dataset import carve_minival, open_split, take_share
from orchestrator.data.streams import TrainStream
from orchestrator.base.errors import UserError
from orchestrator.train.member import open_member_data, train_member
from tests.test_data_faults import make_dataset

CPU = torch.device("cpu")


def config(root, members=4, **data):
    return parse_config({
        "name": "sh", "data": {"root": root, "classes": 4, "train_per_class": 10, "val_per_class": 2, "minival": 2,
                               **data},
        "recipes": {"r": {"epochs": 1, "batch_size": 8, "augment": {"preset": "none"}}},
        "members": [{"arch": "vgg8", "recipe": "r", "seed": s, "resources": {"loader_workers": 0}}
                    for s in range(members)]})


def test_shares_are_disjoint_cover_train_and_are_equal_per_class_within_one():
    labels = np.array([c for c in (0, 1, 2) for _ in range(7)] + [3] * 2)
    np.random.default_rng(0).shuffle(labels)
    parts = [shares.positions(labels, 3, k) for k in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # dataset order
    counts = np.array([np.bincount(labels[p], minlength=4) for p in parts])
    assert counts[:, :3].max() - counts[:, :3].min() <= 1 and counts.sum(0).tolist() == [7, 7, 7, 2]
    assert counts[:, 3].tolist() == [1, 1, 0]  # a class smaller than K leaves the later shares without it
    assert np.array_equal(shares.positions(labels, 3, 1), parts[1])  # deterministic


def test_each_member_trains_on_its_own_share_and_says_so(tiny_root):
    cfg = config(tiny_root, members=5, shares=4)
    members = resolve_members(cfg)
    assert [m.share for m in members] == [0, 1, 2, 3, 0]
    data = [open_member_data(cfg.data, m.share) for m in members[:4]]
    keys = [{s.key for s in d.train.records} for d in data]
    whole = open_member_data(cfg.data)  # without a share: the rest of train, as before
    assert set().union(*keys) == {s.key for s in whole.train.records} and sum(map(len, keys)) == 32
    assert all(np.bincount([s.label for s in d.train.records]).tolist() == [2, 2, 2, 2] for d in data)
    assert all({s.key for s in d.minival.records} == {s.key for s in whole.minival.records} for d in data)
    assert [d.train.share for d in data] == ["1 of 4", "2 of 4", "3 of 4", "4 of 4"] and whole.train.share is None
    notes = {}
    train_member(members[1], data[1], device=CPU, on_notes=notes.update)
    assert notes["data.share"].startswith("trains on share 2 of 4 of train: 8 images")


def test_a_streamed_train_split_is_dealt_as_the_same_split_in_memory(tmp_path, tiny_root):
    root = make_dataset(tmp_path / "d", tiny_root, per_class=9, classes=3)
    streamed, _ = carve_minival(open_split(root, "train"), 2, 0)
    held, _ = carve_minival(open_split(root, "train", classes=3), 2, 0)
    assert streamed.records is None and held.records is not None
    for k, size in enumerate([9, 6, 6]):  # 7 per class after the minival: 3, 2, 2 of each class
        a, b = take_share(streamed, 3, k), take_share(held, 3, k)
        assert a.records is None and len(a) == len(b) == size
        assert [s.key for s in a.iter_samples()] == [s.key for s in b.records]
        assert np.array_equal(a.all_labels(), b.all_labels())
        stream = TrainStream(a, lambda img: img[:, :8, :8], 0, 1, seed=0)
        it = iter(stream)
        one_pass = [int(next(it)[1]) for _ in range(stream.samples_per_pass())]
        assert sorted(one_pass) == sorted(b.all_labels().tolist())  # training reads the share only


def test_shares_stay_out_of_the_key_when_unset_and_an_empty_share_is_refused():
    plain = resolve_members(config("/data/tiny"))
    assert [m.share for m in plain] == [None] * 4
    assert [m.key for m in resolve_members(config("/data/tiny", shares=None))] == [m.key for m in plain]
    assert resolve_members(config("/data/tiny", shares=2))[0].key != plain[0].key
    with pytest.raises(UserError, match=r"data.shares \(9\) leaves an empty share"):
        config("/data/tiny", shares=9)
    with pytest.raises(UserError, match="shares"):
        config("/data/tiny", shares=1)
