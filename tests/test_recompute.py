"""The recompute path: checkpoint + the member's own eval transform, with test-time views."""
import numpy as np
import pytest
import torch

from ensemble import evaluate
from ensemble.predictions import TTA_VIEWS, _views, recompute
from models import save_checkpoint
from orchestrator.config import parse_config, resolve_members
from orchestrator.runs_file import MemberRecord
from orchestrator.train.member import (assemble_predictions, eval_transform_of, open_member_data, predict,
                                       train_member)


@pytest.mark.parametrize("tta", sorted(TTA_VIEWS))
def test_views_have_the_member_input_size(tta):
    views = _views(torch.rand(2, 3, 32, 32), tta, 32)
    assert len(views) == TTA_VIEWS[tta]
    assert all(v.shape[:2] == (2, 3) for v in views)
    if tta in ("none", "flip", "10crop"):
        assert all(v.shape[-2:] == (32, 32) for v in views)


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    cfg = parse_config({"name": "r", "data": {"root": tiny_root, "classes": 4, "train_per_class": 6,
                                              "val_per_class": 3},
                        "recipes": {"r": {"epochs": 1, "batch_size": 8}},
                        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32,
                                     "resources": {"loader_workers": 0}}]})
    member = resolve_members(cfg)[0]
    data = open_member_data(cfg.data)
    model, _ = train_member(member, data, device=torch.device("cpu"))
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(folder / "model.pt"), arch="resnet18", num_classes=4, low_res=True, model=model)
    cached = assemble_predictions([predict(model, data.val, member, torch.device("cpu"))], len(data.val))
    ev, _ = eval_transform_of(member)
    record = MemberRecord(name="m", key="m-k", arch="resnet18", checkpoint=str(folder / "model.pt"),
                          eval=ev.to_dict(), low_res=True)
    return record, cached, tiny_root


def test_recomputed_predictions_agree_with_the_cached_ones(trained, monkeypatch, tmp_path):
    monkeypatch.setattr("ensemble.predictions.CACHE", tmp_path)
    record, cached, root = trained
    fresh = recompute(record, root, "val", 4, 3, "none")
    assert np.abs(np.asarray(fresh.array, dtype=np.float32) - cached.astype(np.float32)).max() < 1e-2
    again = recompute(record, root, "val", 4, 3, "none")  # served from the local cache this time
    assert "cached" in again.source and np.array_equal(np.asarray(again.array[np.arange(12)]), fresh.array)


@pytest.mark.parametrize("tta", ["flip", "10crop", "multiscale"])
def test_tta_predictions_are_probabilities_and_state_their_cost(trained, monkeypatch, tmp_path, tta):
    monkeypatch.setattr("ensemble.predictions.CACHE", tmp_path)
    record, cached, root = trained
    p = recompute(record, root, "val", 4, 3, tta)
    arr = np.asarray(p.array, dtype=np.float32)
    assert arr.shape == cached.shape and np.allclose(arr.sum(1), 1, atol=1e-2)
    assert p.views == TTA_VIEWS[tta] and not np.allclose(arr, cached.astype(np.float32), atol=1e-4)


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    record = MemberRecord(name="lost", key="k", arch="resnet18", checkpoint=str(tmp_path / "nope.pt"),
                          eval={"input_size": 32, "resize": 32, "crop": 32, "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(evaluate.UserError, match="member lost checkpoint: file not found"):
        recompute(record, "/unused", "val", None, None)
