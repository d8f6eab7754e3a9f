"""`python -m ensemble.evaluate`: the report's schema, held-out selection, bad input."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from ensemble import evaluate

EVAL = {"input_size": 32, "resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def make_runs(folder, members=3, n=300, c=10, seed=0, edit=None, extra_member=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    np.save(folder / "labels.npy", labels)
    records = []
    for i in range(members):
        logits = torch.randn(n, c, generator=torch.Generator().manual_seed(seed * 100 + i)) * 1.5
        logits[torch.arange(n), torch.from_numpy(labels)] += 1.0 + i * 0.3
        probs = logits.softmax(1).numpy()
        if edit:
            probs = edit(i, probs)
        np.save(folder / f"m{i}.npy", probs)
        records.append({"name": f"m{i}", "key": f"m{i}-k", "arch": "resnet18", "predictions": str(folder / f"m{i}.npy"),
                        "checkpoint": str(folder / f"m{i}.pt"), "eval": EVAL, "weight": 1.0 + i})
    if extra_member:
        records.append(extra_member)
    runs = {"version": 1, "ensemble": "t", "members": records,
            "dataset": {"name": "synthetic", "uri": str(folder), "split": "val", "num_classes": c, "samples": n,
                        "labels": str(folder / "labels.npy")}}
    (folder / "runs.yaml").write_text(yaml.safe_dump(runs))
    return folder / "runs.yaml", labels


def run(path, tmp_path, *extra):
    out = tmp_path / "out"
    code = evaluate.main(["--members", str(path), "--out", str(out), "--json", str(tmp_path / "r.json"),
                          "--no-mlflow", *extra])
    assert code == 0
    return json.loads((tmp_path / "r.json").read_text()), out


def test_json_report_has_the_documented_shape(tmp_path):
    path, labels = make_runs(tmp_path)
    report, out = run(path, tmp_path)
    assert set(report) >= {"dataset", "members", "ensemble", "best_member", "size_curve", "selection"}
    assert report["dataset"] == {"name": "synthetic", "split": "val", "samples": 300, "num_classes": 10}
    assert [m["name"] for m in report["members"]] == ["m0", "m1", "m2"]
    for m in report["members"] + [report["ensemble"]]:
        for key in ("top1_err", "top5_err", "nll"):
            assert isinstance(m[key], float) and (0 <= m[key] <= 1 or key == "nll")
    e = report["ensemble"]
    assert e["method"] == "mean_softmax" and e["members"] == ["m0", "m1", "m2"] and 0 <= e["ece"] <= 1
    best = min(report["members"], key=lambda m: m["top5_err"])
    assert report["best_member"] == {"name": best["name"], "top5_err": best["top5_err"]}
    assert [p["k"] for p in report["size_curve"]] == [1, 2, 3]
    assert report["size_curve"][-1]["top5_err"] == pytest.approx(e["top5_err"])  # all members = the ensemble
    assert report["size_curve"][0]["top5_err"] == pytest.approx(best["top5_err"])  # sorted order starts at the best
    assert report["selection"] is None
    assert {p.name for p in out.iterdir()} == {"report.json", "report.csv", "size_curve.png", "members.png",
                                                "reliability.png"}
    assert (out / "size_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_report_matches_a_direct_computation(tmp_path):
    from ensemble import math as em

    path, labels = make_runs(tmp_path)
    report, _ = run(path, tmp_path)
    probs = [np.load(tmp_path / f"m{i}.npy").astype(np.float32) for i in range(3)]
    mean = em.combine(probs)
    assert report["ensemble"]["top1_err"] == pytest.approx(em.topk_error(mean, labels, 1))
    assert report["ensemble"]["top5_err"] == pytest.approx(em.topk_error(mean, labels, 5))
    assert report["ensemble"]["nll"] == pytest.approx(em.nll(mean, labels), rel=1e-4)
    assert report["ensemble"]["ece"] == pytest.approx(em.ece(mean, labels), abs=1e-6)
    assert report["members"][1]["top1_err"] == pytest.approx(em.topk_error(probs[1], labels, 1))
    weighted, _ = run(path, tmp_path, "--method", "weighted")
    assert weighted["ensemble"]["top1_err"] == pytest.approx(
        em.topk_error(em.combine(probs, weights=[1, 2, 3]), labels, 1))


def test_selection_and_calibration_are_fitted_on_held_out_rows_only(tmp_path):
    path, labels = make_runs(tmp_path, n=400)
    report, _ = run(path, tmp_path, "--select", "greedy", "--calibrate", "--selection-fraction", "0.25")
    sel = report["selection"]
    assert sel["samples"] == 100 and report["dataset"]["samples"] == 300  # disjoint: 100 fit, 300 reported
    assert sum(sel["weights"].values()) == pytest.approx(1.0)
    assert all(t > 0 for t in sel["temperatures"].values())
    assert report["size_curve"][0]["order"] == "greedy"
    assert report["ensemble"]["members"] == [n for n, w in sel["weights"].items() if w > 0]


def bad(tmp_path, capsys, **kwargs):
    path, _ = make_runs(tmp_path, **kwargs)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--members", str(path), "--out", str(tmp_path / "o"), "--no-mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    return err[-1]


def test_nan_predictions(tmp_path, capsys):
    def nan(i, p):
        if i == 1:
            p[7, 3] = np.nan
        return p
    assert bad(tmp_path, capsys, edit=nan) == "error: member m1: predictions contain NaN or inf (row 7)"


def test_rows_that_are_not_probabilities(tmp_path, capsys):
    line = bad(tmp_path, capsys, edit=lambda i, p: p * 3 if i == 2 else p)
    assert line.startswith("error: member m2: prediction rows must sum to 1 (row 0")


def test_class_and_sample_count_disagreements(tmp_path, capsys):
    assert bad(tmp_path, capsys, edit=lambda i, p: p[:, :9] if i == 0 else p) == \
        "error: member m0: 9 classes, but the dataset has 10"
    assert bad(tmp_path, capsys, edit=lambda i, p: p[:299] if i == 2 else p) == \
        "error: member m2: 299 samples, but the labels have 300"


def test_missing_artifact_and_unknown_key(tmp_path, capsys):
    path, _ = make_runs(tmp_path)
    os.remove(tmp_path / "m1.npy")
    with pytest.raises(SystemExit):
        evaluate.main(["--members", str(path), "--no-mlflow", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == f"error: member m1 predictions: file not found: {tmp_path / 'm1.npy'}"
    raw = yaml.safe_load(path.read_text())
    raw["members"][0]["temperature"] = 2.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        evaluate.main(["--members", str(path), "--no-mlflow"])
    assert capsys.readouterr().err.strip() == f"error: {path}: members.0.temperature: unknown key"


def test_failed_members_are_skipped_with_a_warning(tmp_path, capsys):
    failed = {"name": "diverged", "key": "d-k", "arch": "vgg11_bn", "status": "failed", "eval": EVAL,
              "error": "NonFiniteLoss: loss is nan"}
    path, _ = make_runs(tmp_path, extra_member=failed)
    report, _ = run(path, tmp_path)
    assert [m["name"] for m in report["members"]] == ["m0", "m1", "m2"]
    assert "skipping member diverged: status failed" in capsys.readouterr().err


@pytest.mark.parametrize("count", [2, 12])
def test_the_members_plot_legend_covers_no_bar_name_or_title(tmp_path, monkeypatch, count):
    from ensemble import report as rep

    figures = []
    monkeypatch.setattr(rep.plt, "close", figures.append)  # keep the figure to measure it
    members = [{"name": f"resnet20-adamw-crops-s{i}-long-name", "top1_err": 0.85, "top5_err": 0.6}
               for i in range(count)]
    rep.plot_members(str(tmp_path / "m.png"), {"members": members, "ensemble": {"top1_err": 0.8, "top5_err": 0.55}})
    fig = figures[0]
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(r)
    others = ([t.get_window_extent(r) for t in ax.get_xticklabels()] + [p.get_window_extent(r) for p in ax.patches]
              + [ax.title.get_window_extent(r)])
    assert not any(legend.overlaps(box) for box in others)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1 and legend.y1 <= fig.bbox.y1  # in the image
