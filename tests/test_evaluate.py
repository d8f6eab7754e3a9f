"""`python -m ensemble.evaluate`: the report's schema, held-out selection, bad input."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from ensemble import evaluate
from ensemble.core import math as em

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
    best = min(report["members"], key=lambda m: m["top5_err"])  # no minival, nothing held out: chosen on val
    assert report["best_member"] == {"name": best["name"], "top5_err": best["top5_err"],
                                     "chosen_on": "val (optimistic)", "chosen_samples": None}
    assert [p["k"] for p in report["size_curve"]] == [1, 2, 3]
    assert report["size_curve"][-1]["top5_err"] == pytest.approx(e["top5_err"])  # all members = the ensemble
    assert report["size_curve"][0]["top5_err"] == pytest.approx(best["top5_err"])  # sorted order starts at the best
    assert report["selection"] is None
    assert {p.name for p in out.iterdir()} == {"report.json", "report.csv", "size_curve.png", "members.png",
                                                "reliability.png"}
    assert (out / "size_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_report_matches_a_direct_computation(tmp_path):
    from ensemble.core import math as em

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
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: members.0.temperature: unknown key; valid keys there: name, key, arch, ")
    assert "did you mean" not in err and len(err.splitlines()) == 1
    raw["members"][0] = {k: v for k, v in raw["members"][0].items() if k != "temperature"}
    raw["members"][0]["wieght"] = raw["members"][0].pop("weight")  # misspelt: the closest valid key is named
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        evaluate.main(["--members", str(path), "--no-mlflow"])
    assert f"{path}: members.0.wieght: unknown key (did you mean 'weight'?); valid keys there:" in capsys.readouterr().err


def test_failed_members_are_skipped_with_a_warning(tmp_path, capsys):
    failed = {"name": "diverged", "key": "d-k", "arch": "vgg11_bn", "status": "failed", "eval": EVAL,
              "error": "NonFiniteLoss: loss is nan"}
    path, _ = make_runs(tmp_path, extra_member=failed)
    report, _ = run(path, tmp_path)
    assert [m["name"] for m in report["members"]] == ["m0", "m1", "m2"]
    assert "skipping member diverged: status failed" in capsys.readouterr().err


@pytest.mark.parametrize("count", [2, 12])
def test_the_members_plot_legend_covers_no_bar_name_or_title(tmp_path, monkeypatch, count):
    from ensemble.views import report as rep

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


def runs_where_minival_and_val_disagree(folder, with_minival=True):
    """m0 is the strongest member on the minival and the weakest on val; m1 the reverse."""
    from tests.test_minival import _probs

    rng = np.random.default_rng(5)
    n, n_mv, c = 600, 300, 10
    y, y_mv = rng.integers(0, c, n), rng.integers(0, c, n_mv)
    np.save(folder / "labels.npy", y)
    np.save(folder / "mv_labels.npy", y_mv)
    members = []
    for i, (on_val, on_minival) in enumerate([(1.0, 3.5), (3.0, 0.5), (2.0, 2.0)]):
        np.save(folder / f"m{i}.npy", _probs(rng, n, c, y, on_val))
        np.save(folder / f"mv{i}.npy", _probs(rng, n_mv, c, y_mv, on_minival))
        members.append({"name": f"m{i}", "key": f"m{i}-k", "arch": "resnet18", "predictions": str(folder / f"m{i}.npy"),
                        "eval": EVAL, **({"minival_predictions": str(folder / f"mv{i}.npy")} if with_minival else {})})
    ds = {"name": "t", "uri": str(folder), "split": "val", "num_classes": c, "samples": n,
          "labels": str(folder / "labels.npy")}
    runs = {"version": 1, "ensemble": "t", "dataset": ds, "members": members}
    if with_minival:
        runs["minival"] = {**ds, "split": "train@minival:30:0", "samples": n_mv, "labels": str(folder / "mv_labels.npy")}
    (folder / "runs.yaml").write_text(yaml.safe_dump(runs))
    return folder / "runs.yaml", y


def test_the_best_member_is_the_minivals_choice_reported_on_val(tmp_path, capsys):
    from ensemble.core import math as em

    path, y = runs_where_minival_and_val_disagree(tmp_path)
    report, _ = run(path, tmp_path)
    vals = {m["name"]: m for m in report["members"]}
    assert min(vals, key=lambda k: vals[k]["top1_err"]) == "m1"  # val would have named m1
    e = report["ensemble"]
    assert e["best_member_top1"] == e["best_member_top5"] == "m0" and e["best_member_chosen_on"] == "minival"
    assert report["best_member"]["chosen_on"] == "the minival" and report["best_member"]["chosen_samples"] == 300
    mean = em.combine([np.load(tmp_path / f"m{i}.npy") for i in range(3)])
    for k in (1, 5):  # the gain is over m0's val error, not the lowest val error
        assert e[f"gain_top{k}_over_best"] == pytest.approx(vals["m0"][f"top{k}_err"] - em.topk_error(mean, y, k))
    assert report["size_curve"][0]["member"] == "m0"  # the sorted curve starts at the minival's best
    out = capsys.readouterr().out
    assert "vs best member m0 " in out and "(chosen on the minival):" in out


def test_without_a_minival_the_line_says_best_on_val_is_optimistic(tmp_path, capsys):
    path, _ = runs_where_minival_and_val_disagree(tmp_path, with_minival=False)
    report, _ = run(path, tmp_path)
    assert report["ensemble"]["best_member_top1"] == "m1" and report["ensemble"]["best_member_chosen_on"] == "val"
    assert "vs best on val (optimistic) m1 " in capsys.readouterr().out
    # with rows held out for --select, the best member is chosen on them, not on the reported rows
    report, _ = run(path, tmp_path, "--select", "greedy")
    assert report["ensemble"]["best_member_chosen_on"] == "held-out"
    assert report["best_member"]["chosen_samples"] == 300 and report["dataset"]["samples"] == 300


def test_the_gain_interval_is_paired(tmp_path):
    """One resample of rows serves ensemble and best member (an independent float64
    bootstrap with the same draws gives the same interval); resampling them apart gives a
    much wider one on these correlated members (each a small blend away from the others)."""
    shared = None

    def blend(i, probs):  # every member mostly the first one: the ensemble misses where its best does
        nonlocal shared
        shared = probs if shared is None else shared
        return (0.85 * shared + 0.15 * probs).astype(np.float32)

    path, y = make_runs(tmp_path, n=800, edit=blend)
    report, _ = run(path, tmp_path, "--bootstrap", "400", "--seed", "3")
    from ensemble.core import math as em

    mean = em.combine([np.load(tmp_path / f"m{i}.npy") for i in range(3)]).numpy().astype(np.float64)
    best_name = report["ensemble"]["best_member_top1"]
    assert report["ensemble"]["best_member_top5"] == best_name
    best = np.load(tmp_path / f"{best_name}.npy").astype(np.float64)

    def misses(p, k):
        true = p[np.arange(len(y)), y][:, None]
        return ((p >= true).sum(1) - 1 >= k).astype(np.float64)

    n, rng = len(y), np.random.default_rng(3)
    draws = [rng.integers(0, n, n) for _ in range(400)]
    for k in (1, 5):
        d_best, d_ens = misses(best, k), misses(mean, k)
        paired = np.percentile([(d_best[i] - d_ens[i]).mean() for i in draws], [2.5, 97.5])
        unpaired = np.percentile([d_best[i].mean() - d_ens[j].mean() for i, j in zip(draws, draws[1:] + draws[:1])],
                                 [2.5, 97.5])
        got = report["ensemble"][f"gain_top{k}_over_best_ci"]
        assert got == pytest.approx(list(paired), abs=1e-12)
        assert np.diff(got)[0] < 0.5 * np.diff(unpaired)[0]


def test_rows_read_by_index_match_numpy_for_any_order_and_repeats(tmp_path):
    from ensemble.core.stored import NpyRows

    rng = np.random.default_rng(0)
    array = rng.standard_normal((97, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    rows = NpyRows(str(tmp_path / "a.npy"))
    cases = [np.array([0, 2, 1, 3]), np.array([3, 1]), np.array([5, 5, 5]), np.array([-1, 0]), np.array([], dtype=int)]
    cases += [rng.integers(0, 97, int(rng.integers(1, 40))) for _ in range(50)]
    cases += [np.sort(rng.choice(97, 30, replace=False)), np.arange(10, 20)]
    for idx in cases:
        np.testing.assert_array_equal(rows[idx], array[idx])
    for index in (slice(3, 9), slice(None, None, 7), 4, -2):
        np.testing.assert_array_equal(rows[index], array[index])


def test_a_runs_file_with_no_parent_run_is_evaluated_whatever_tracking_server_is_set(tmp_path, monkeypatch):
    """Nothing will be logged (no parent run named), so a down server named by
    MLFLOW_TRACKING_URI does not stop the evaluation."""
    path, _ = make_runs(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert evaluate.main(["--members", str(path), "--out", str(tmp_path / "o")]) == 0


def test_the_library_gives_the_clis_figures_without_argparse(tmp_path):
    """From Python or a notebook: `evaluate(runs, options) -> Report`, no argv, no files."""
    from ensemble.core.evaluation import evaluate as evaluate_runs
    from ensemble.core.options import EvaluateOptions
    from orchestrator.records.runs_file import load_runs

    path, _ = make_runs(tmp_path)
    cli, _ = run(path, tmp_path, "--select", "greedy", "--calibrate")
    options = EvaluateOptions(select="greedy", calibrate=True, log_mlflow=False)
    report = evaluate_runs(load_runs(str(path)), options)
    assert report.as_dict() == cli  # the same figures, every one
    assert report.ensemble.top5_err == cli["ensemble"]["top5_err"] and report.member("m1").img_size == 32
    assert report.member("m0").crop_pct == 1.0 and report.member("m0").param_count is None  # timm's fields
    assert not (tmp_path / "ensemble-report").exists()  # a library call writes nothing
    with pytest.raises(ValueError, match="select"):
        EvaluateOptions(select="best")  # typed: a wrong choice is refused where it is made


def with_costs(path, macs=(1e6, 2e6, 4e6), params=(1e5, 2e5, 4e5)):
    """Give the runs file's members the inference cost a trained member records (models/cost.py)."""
    runs = yaml.safe_load(path.read_text())
    for m, mac, p in zip(runs["members"], macs, params):
        m["metrics"] = {"macs": mac, "params": p, "infer_ms_b1": mac / 1e6, "infer_images_per_s_b64": 1e9 / mac,
                        "infer_peak_mb": 10.0}
        m["cost_machine"] = "cpu: x86_64, 2 threads"
    path.write_text(yaml.safe_dump(runs))


def test_members_and_the_ensemble_report_their_cost_and_the_accuracy_cost_front(tmp_path, capsys):
    path, _ = make_runs(tmp_path)
    with_costs(path)
    report, out = run(path, tmp_path)
    assert [m["macs"] for m in report["members"]] == [1e6, 2e6, 4e6] and report["members"][2]["param_count"] == 400000
    cost = report["ensemble"]["cost"]  # every member runs on every image: the sum
    assert cost["macs"] == 7e6 and cost["infer_ms_b1"] == 7.0 and cost["param_count"] == 700000
    assert "MACs" in capsys.readouterr().out
    ac = report["accuracy_cost"]
    assert ac["front_from"] == "every subset" and len(ac["members"]) == 3 and len(ac["path"]) == 2
    front = ac["front"]  # cheapest first, each better than every cheaper point
    assert [p["macs"] for p in front] == sorted(p["macs"] for p in front)
    assert all(a["top1_err"] > b["top1_err"] for a, b in zip(front, front[1:]))
    assert (out / "accuracy_cost.png").stat().st_size > 10_000


def test_many_members_draw_the_front_from_budgeted_selections_not_every_subset(tmp_path):
    """13 members are 8,178 subsets: the front comes from Caruana's selection within budgets
    from the cheapest member to all of them, each point's error its weighted mean's on val."""
    from ensemble.core.costs import MAX_SUBSETS

    m = 13
    path, labels = make_runs(tmp_path, members=m)
    macs = [1e6 * (1 + i) for i in range(m)]
    with_costs(path, macs=macs, params=[1e5] * m)
    assert 2 ** m - m - 1 > MAX_SUBSETS
    report, out = run(path, tmp_path)
    ac = report["accuracy_cost"]
    assert ac["front_from"].startswith("budgeted selections")
    assert 2 <= len(ac["budgeted"]) <= 8
    for p in ac["budgeted"]:
        assert p["macs"] == sum(macs[int(n[1:])] for n in p["members"])  # distinct members' sum
    assert min(p["macs"] for p in ac["budgeted"]) <= macs[0] * 1.000001  # the cheapest budget: one member
    cheapest = min(ac["budgeted"], key=lambda p: p["macs"])
    alone = np.load(tmp_path / f"{cheapest['members'][0]}.npy")
    wrong = int((em.true_class_rank(torch.from_numpy(alone), torch.from_numpy(labels)) >= 1).sum()) / len(labels)
    assert len(cheapest["members"]) == 1 and cheapest["top1_err"] == pytest.approx(wrong, abs=1e-12)
    front = ac["front"]
    assert all(a["top1_err"] > b["top1_err"] and a["macs"] <= b["macs"] for a, b in zip(front, front[1:]))
    assert (out / "accuracy_cost.png").stat().st_size > 10_000


def test_a_budgeted_selection_stays_within_its_budget_and_says_what_it_cost(tmp_path, capsys):
    path, _ = make_runs(tmp_path, members=3)
    with_costs(path)
    free, _ = run(path, tmp_path, "--select", "greedy")
    report, _ = run(path, tmp_path, "--select", "greedy", "--budget-macs", "3.5e6")
    costs = {"m0": 1e6, "m1": 2e6, "m2": 4e6}
    kept = {n for n, w in report["selection"]["weights"].items() if w > 0}
    budget = report["selection"]["budget"]
    assert sum(costs[n] for n in kept) == budget["cost"] <= 3.5e6 and "m2" not in kept
    assert budget["unbudgeted_cost"] == sum(costs[n] for n, w in free["selection"]["weights"].items() if w > 0)
    assert budget["unbudgeted_top1_err"] == free["ensemble"]["top1_err"]
    assert budget["top1_err_cost"] == report["ensemble"]["top1_err"] - free["ensemble"]["top1_err"]
    assert "budget 3.5 M: the selection costs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # a budget below every member: one line, exit 2
        evaluate.main(["--members", str(path), "--no-mlflow", "--out", str(tmp_path / "o"), "--select", "greedy",
                       "--budget-macs", "5e5"])
    assert exit_.value.code == 2 and "no member fits the budget" in capsys.readouterr().err


def test_only_named_members_are_scored_and_a_wrong_name_is_one_line(tmp_path, capsys):
    path, _ = make_runs(tmp_path)
    report, _ = run(path, tmp_path, "--only", "m2,m0")
    assert [m["name"] for m in report["members"]] == ["m2", "m0"]
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--members", str(path), "--only", "m9", "--no-mlflow", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown finished member (--only) 'm9'") and "valid choices: m0, m1, m2" in err[-1]
