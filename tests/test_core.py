"""The training core on CPU, with no Ray and no MLflow: it learns, it resumes exactly."""
import math

import numpy as np
import pytest
import torch

from ensemble.core import math as em
from ensemble.core.math import topk_error
from orchestrator.config import parse_config, resolve_members
from orchestrator.train import loop
from orchestrator.train.member import (assemble_predictions, open_member_data, predict, score_stored, split_labels,
                                       train_member)

CPU = torch.device("cpu")


def core_config(tiny_root, **recipe):
    """One low-res ResNet-18 member on a 4-class subset; recipe fields override."""
    return parse_config({
        "name": "core", "data": {"root": tiny_root, "classes": 4, "train_per_class": 8, "val_per_class": 4},
        "recipes": {"r": {"epochs": 3, "batch_size": 8, "augment": {"preset": "none"},
                          "optimizer": {"name": "sgd", "lr": 0.4}, **recipe}},
        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32,
                     "resources": {"loader_workers": 0}}]})


def member_and_data(tiny_root, **recipe):
    cfg = core_config(tiny_root, **recipe)
    return resolve_members(cfg)[0], open_member_data(cfg.data)


def test_topk_correct_counts_and_small_class_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.35, 0.25, 0.4]])
    labels = torch.tensor([1, 2, 0])
    assert [int(em.topk_correct(logits, labels, k).sum()) for k in (1, 2)] == [1, 3]
    assert [int(em.topk_correct(logits, labels, k).sum()) for k in (1, 5)] == [1, 3]  # k > classes: all in the top-k


def test_member_learns_and_reports_every_epoch_metric(tiny_root):
    member, data = member_and_data(tiny_root, epochs=4)
    seen, kept = [], []
    model, state = train_member(member, data, device=CPU,
                                on_epoch_end=lambda s, m, _m, _o, p: (seen.append(dict(m)), kept.append(p)))
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4]
    assert kept[:3] == [None] * 3 and sorted(kept[3]) == list(range(16))  # the final pass keeps predictions
    for m in seen:
        for key in ("train_loss", "val_top1_err", "val_top5_err", "lr", "images_per_s"):
            assert math.isfinite(m[key])
        assert m["val_samples"] == 16 and 0 <= m["val_top5_err"] <= m["val_top1_err"] <= 1
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert seen[-1]["lr"] < seen[0]["lr"]  # cosine decays
    probs = assemble_predictions([predict(model, data.val, member, CPU)], len(data.val))
    assert probs.shape == (16, 4) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # the kept predictions are the trained model's: a fresh pass gives the same rows
    assert np.array_equal(assemble_predictions([kept[3]], len(data.val)), probs)
    labels = split_labels(data.val)
    # the epoch's figure is scored on the very rows that are stored, by the same rule
    assert topk_error(probs, labels, 1) == seen[-1]["val_top1_err"]
    assert topk_error(probs, labels, 5) == seen[-1]["val_top5_err"]


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_root):
    member, data = member_and_data(tiny_root, epochs=2)
    torch.use_deterministic_algorithms(True)
    try:
        full, _ = train_member(member, data, device=CPU)
        saved = {}

        def stop_after_first(state, metrics, model, optimizer, probs):
            if state.epoch == 1:
                saved.update(state_dict={k: v.clone() for k, v in model.state_dict().items()},
                             optimizer=optimizer.state_dict(), epoch=state.epoch, step=state.step,
                             history=list(state.history))
                raise KeyboardInterrupt  # the worker dies after its epoch-1 checkpoint

        with pytest.raises(KeyboardInterrupt):
            train_member(member, data, device=CPU, on_epoch_end=stop_after_first)
        resumed, state = train_member(member, data, device=CPU, resume=saved)
    finally:
        torch.use_deterministic_algorithms(False)
    assert state.epoch == 2 and len(state.history) == 2
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_diverging_loss_fails_loudly(tiny_root):
    member, data = member_and_data(tiny_root, epochs=1, optimizer={"name": "sgd", "lr": 1.0e12})
    with pytest.raises(loop.NonFiniteLoss, match="loss is (nan|inf)"):
        train_member(member, data, device=CPU)


def test_predictions_must_cover_every_sample_once():
    row = torch.ones(3) / 3
    with pytest.raises(RuntimeError, match="covers 1 of 2|cover 1 of 2"):
        assemble_predictions([{0: row}], 2)
    with pytest.raises(RuntimeError, match="scored by two workers"):
        assemble_predictions([{0: row}, {0: row}], 1)


def test_a_nan_mid_window_is_reported_at_its_own_step():
    """The loss is checked every CHECK_EVERY steps (no host sync per step), yet the error
    names the first step whose loss was not finite."""
    losses = [torch.tensor(1.0)] * 7 + [torch.tensor(float("nan"))] + [torch.tensor(float("nan"))] * 3
    with pytest.raises(loop.NonFiniteLoss, match="loss is nan at step 107 "):
        loop._check_finite(losses, [8] * len(losses), first_step=100, epoch=0)
    assert loop._check_finite([torch.tensor(2.0), torch.tensor(1.0)], [8, 4], 0, 0) == 20.0


def test_compile_time_is_reported_once_per_process(tiny_root, monkeypatch):
    """`recipe.compile` logs compile_s (first step minus a steady step) in the first epoch
    of a process only; torch.compile itself is replaced here, its cost is bench/compile_bench.py's."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    member, data = member_and_data(tiny_root, epochs=2, compile=True)
    seen = []
    train_member(member, data, device=CPU, on_epoch_end=lambda s, m, *_: seen.append(dict(m)))
    assert len(compiled) == 1
    assert seen[0]["compile_s"] >= 0 and "compile_s" not in seen[1]
    assert all(m["first_step_s"] > 0 and m["step_s"] > 0 for m in seen)


def test_final_errors_are_those_of_the_stored_predictions():
    # an exact tie between the true class 0 and class 1 in the stored rows
    stored = np.array([[0.4, 0.4, 0.2], [0.8, 0.1, 0.1]], dtype=np.float32)
    labels = np.array([0, 0])
    metrics = {"val_top1_err": 0.0, "val_top5_err": 0.0}  # as an arbitrary tie-break counted them
    score_stored(metrics, stored, labels)
    # what ensemble.evaluate will report for this member: the tie is not a hit
    assert metrics["val_top1_err"] == topk_error(stored, labels, 1) == 0.5
