"""The held-out minival: carved from train, never trained on, the split every choice is
made on; val is scored once, at the end, only to be reported."""
import json

import numpy as np
import pytest
import torch
import yaml

from ensemble import evaluate
from orchestrator.config import parse_config, resolve_members
from orchestrator.data import minival
from orchestrator.base.errors import UserError
from orchestrator.drivers.search_choice import compare
from orchestrator.train import loop
from orchestrator.train.member import (LABELS_FILE, MINIVAL_LABELS_FILE, MINIVAL_PREDICTIONS_FILE, PREDICTIONS_FILE,
                                       final_outputs, open_member_data, train_member)

CPU = torch.device("cpu")


def config(tiny_root, **data):
    return parse_config({
        "name": "mv", "data": {"root": tiny_root, "classes": 4, "train_per_class": 10, "val_per_class": 4, **data},
        "recipes": {"r": {"epochs": 2, "batch_size": 8, "augment": {"preset": "none"}}},
        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32, "resources": {"loader_workers": 0}}]})


def test_carving_is_per_class_seeded_and_disjoint():
    labels = [c for c in range(5) for _ in range(12)]
    rest, held = minival.carve(labels, 5, 3, seed=0)
    assert sorted(rest + held) == list(range(60)) and not set(rest) & set(held)
    assert np.bincount(np.asarray(labels)[held], minlength=5).tolist() == [3] * 5
    assert minival.carve(labels, 5, 3, seed=0) == (rest, held)  # deterministic
    assert minival.carve(labels, 5, 3, seed=1)[1] != held  # the seed matters
    with pytest.raises(UserError, match="leaves no training sample of class 0"):
        minival.carve(labels, 5, 12, seed=0)


def test_member_data_holds_the_minival_out_of_train(tiny_root):
    data = open_member_data(config(tiny_root, minival=3).data)
    train_keys = {s.key for s in data.train.records}
    held_keys = {s.key for s in data.minival.records}
    assert len(held_keys) == 12 and len(train_keys) == 28 and not train_keys & held_keys
    assert np.bincount([s.label for s in data.minival.records]).tolist() == [3, 3, 3, 3]
    plain = open_member_data(config(tiny_root).data)
    assert {s.key for s in plain.train.records} == train_keys | held_keys  # carved from train, nothing else


def test_minival_stays_out_of_the_key_when_unset(tiny_root):
    # the key this member had before data.minival existed: re-running an old job retrains nothing
    plain = resolve_members(config("/data/tiny"))[0]
    cfg = parse_config({"name": "core", "data": {"root": "/data/tiny", "classes": 4, "train_per_class": 8,
                                                 "val_per_class": 4},
                        "recipes": {"r": {"epochs": 3, "batch_size": 8, "augment": {"preset": "none"},
                                          "optimizer": {"name": "sgd", "lr": 0.4}}},
                        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32,
                                     "resources": {"loader_workers": 0}}]})
    assert resolve_members(cfg)[0].key == "resnet18-r-s0-77483225"
    assert resolve_members(config("/data/tiny", minival=3))[0].key != plain.key


def test_every_epoch_is_scored_on_minival_and_val_once_at_the_end(tiny_root, monkeypatch):
    cfg = config(tiny_root, minival=3)
    member, data = resolve_members(cfg)[0], open_member_data(cfg.data)
    scored = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: scored.append(k.get("split", "val")) or real(*a, **k))
    seen, files = [], {}

    def on_epoch_end(state, metrics, model, optimizer, probs):
        if probs is not None:
            files.update(final_outputs(probs, lambda p: [p], model, member, data, metrics, CPU))
        seen.append(dict(metrics))

    train_member(member, data, device=CPU, on_epoch_end=on_epoch_end)
    assert scored == ["minival", "minival", "val"]
    assert "minival_top1_err" in seen[0] and "val_top1_err" not in seen[0]
    assert set(files) == {PREDICTIONS_FILE, LABELS_FILE, MINIVAL_PREDICTIONS_FILE, MINIVAL_LABELS_FILE}
    assert files[PREDICTIONS_FILE].shape == (16, 4) and files[MINIVAL_PREDICTIONS_FILE].shape == (12, 4)
    assert files[MINIVAL_LABELS_FILE].tolist() == [s.label for s in data.minival.records]
    from ensemble.core.math import topk_error
    assert seen[-1]["val_top1_err"] == topk_error(files[PREDICTIONS_FILE], files[LABELS_FILE], 1)
    assert seen[-1]["minival_top1_err"] == topk_error(files[MINIVAL_PREDICTIONS_FILE], files[MINIVAL_LABELS_FILE], 1)


EVAL = {"input_size": 32, "resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def _probs(rng, n, c, labels, strength):
    z = rng.standard_normal((n, c)) * 1.5
    z[np.arange(n), labels] += strength
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def write_runs(folder, *, with_minival=True, choices=()):
    rng = np.random.default_rng(0)
    n, n_mv, c = 200, 60, 5
    y, y_mv = rng.integers(0, c, n), rng.integers(0, c, n_mv)
    np.save(folder / "labels.npy", y)
    np.save(folder / "mv_labels.npy", y_mv)
    members = []
    for i in range(3):
        np.save(folder / f"m{i}.npy", _probs(rng, n, c, y, 1.0 + i))
        np.save(folder / f"mv{i}.npy", _probs(rng, n_mv, c, y_mv, 1.0 + i))
        members.append({"name": f"m{i}", "key": f"m{i}-k", "arch": "resnet18", "predictions": str(folder / f"m{i}.npy"),
                        "eval": EVAL, **({"minival_predictions": str(folder / f"mv{i}.npy")} if with_minival else {})})
    ds = {"name": "t", "uri": str(folder), "split": "val", "num_classes": c, "samples": n,
          "labels": str(folder / "labels.npy")}
    runs = {"version": 1, "ensemble": "t", "dataset": ds, "members": members, "choices": list(choices)}
    if with_minival:
        runs["minival"] = {**ds, "split": "train@minival:12:0", "samples": n_mv, "labels": str(folder / "mv_labels.npy")}
    (folder / "runs.yaml").write_text(yaml.safe_dump(runs))
    return folder / "runs.yaml"


def run_eval(path, tmp_path, *extra):
    assert evaluate.main(["--members", str(path), "--out", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json"),
                          "--no-mlflow", *extra]) == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_evaluate_chooses_on_minival_and_reports_every_val_row(tmp_path):
    report = run_eval(write_runs(tmp_path), tmp_path, "--select", "greedy", "--calibrate")
    assert report["dataset"]["samples"] == 200  # no val row spent on choosing
    assert report["selection"]["samples"] == 60
    assert report["protocol"]["chosen_on"].startswith("train@minival:12:0")
    assert report["protocol"]["reported_on"] == "val: 200 rows"


def test_a_version_1_runs_file_without_minival_still_holds_out_half(tmp_path):
    report = run_eval(write_runs(tmp_path, with_minival=False), tmp_path, "--select", "greedy")
    assert report["dataset"]["samples"] == 100 and report["selection"]["samples"] == 100
    assert "no minival" in report["protocol"]["notes"][0]


def test_rows_a_search_chose_on_are_never_reported(tmp_path):
    choice = {"what": "the trials that became members", "split": "val", "samples": 50, "fraction": 0.25, "seed": 0}
    report = run_eval(write_runs(tmp_path, with_minival=False, choices=[choice]), tmp_path)
    assert report["dataset"]["samples"] == 150  # even without --select
    assert report["protocol"]["choices"][0]["what"] == "the trials that became members"


def test_search_choice_on_minival_reports_on_all_of_val():
    rng = np.random.default_rng(3)
    y, y_mv = rng.integers(0, 5, 100), rng.integers(0, 5, 40)
    preds = [_probs(rng, 100, 5, y, s) for s in (0.5, 1.0, 2.0)]
    held = [_probs(rng, 40, 5, y_mv, s) for s in (0.5, 1.0, 2.0)]
    out = compare(preds, y, 2, "nll", 0.5, selection=(held, y_mv))
    assert out["selection_rows"] == 40 and out["report_rows"] == 100
    assert out["topk"]["chosen"][0] == 2  # the strongest on minival


def test_the_search_names_the_best_member_the_minival_chose_and_reports_it_on_val():
    from ensemble.core.math import topk_error

    rng = np.random.default_rng(4)
    y, y_mv = rng.integers(0, 5, 300), rng.integers(0, 5, 150)
    preds = [_probs(rng, 300, 5, y, s) for s in (3.0, 1.0, 2.0)]  # trial 0 is the best on val
    held = [_probs(rng, 150, 5, y_mv, s) for s in (0.5, 3.0, 2.0)]  # trial 1 is the best on the minival
    out = compare(preds, y, 3, "nll", 0.5, selection=(held, y_mv))
    for kind in ("topk", "greedy"):
        c = out[kind]
        chosen_best = min(c["chosen"], key=lambda i: topk_error(held[i], y_mv, 1))
        assert c["best_member"] == chosen_best
        assert c["best_member_top1_err"] == topk_error(preds[chosen_best], y, 1)
    assert out["topk"]["best_member"] == 1


def test_a_minival_as_large_as_train_is_refused_at_load():
    with pytest.raises(UserError, match=r"data.minival \(10 per class\) must be below data.train_per_class \(10\)"):
        config("/data/tiny", minival=10)


def test_a_data_parallel_member_keeps_its_last_epoch_not_its_best_on_a_held_out_split():
    from orchestrator.runtime.launch import checkpoint_config

    cc = checkpoint_config()
    assert (cc.num_to_keep, cc.checkpoint_score_attribute, cc.checkpoint_score_order) == (1, "epoch", "max")
