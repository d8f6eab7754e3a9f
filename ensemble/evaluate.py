"""Evaluate an ensemble from its runs file: every member, the ensemble, the gain.

    python -m ensemble.evaluate --members runs.yaml
    python -m ensemble.evaluate --members s3://bucket/ens/runs.yaml --json report.json \
        --select greedy --calibrate --tta flip

Prints top-1/top-5 error (and NLL, ECE) of every member and of the ensemble with the gain
over the best member; writes a report folder (report.json, report.csv, size_curve.png,
members.png, reliability.png); logs metrics and plots to the ensemble's MLflow parent
run when the runs file names one (or MLFLOW_TRACKING_URI is set). Selection and
temperatures are fitted on a held-out part of the split, and the report is on the rest.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ensemble import math as em
from ensemble import report as rep
from ensemble.logged import log_to_mlflow, mlflow_target
from ensemble.predictions import recompute
from ensemble.protocol import Protocol, protocol_for
from ensemble.scoring import intervals, size_curves, score
from ensemble.serve import log_ensemble_model
from ensemble.stored import MemberPredictions, open_npy
from ensemble.tta import TTA_VIEWS
from orchestrator.base.errors import UserError, exit_on_user_error
from orchestrator.base.outages import check_tracking, exit_on_outage
from orchestrator.records.runs_file import RunsFile, load_runs

METHODS = {"mean_softmax": "mean", "weighted": "mean", "geometric": "geometric"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--members", required=True, help="runs.yaml written by jobs/train_ensemble.py (path or URL)")
    p.add_argument("--out", default="ensemble-report", help="report folder (default: %(default)s)")
    p.add_argument("--json", help="also write the JSON report here")
    p.add_argument("--method", default="mean_softmax", choices=sorted(METHODS),
                   help="mean_softmax (default), weighted (weights from runs.yaml), geometric (= logit mean)")
    p.add_argument("--select", choices=["none", "greedy"], default="none",
                   help="greedy: Caruana ensemble selection with replacement on the selection split")
    p.add_argument("--select-rounds", type=int, default=None, help="greedy steps (default: 2 x members)")
    p.add_argument("--select-metric", choices=["nll", "top1", "top5"], default="nll")
    p.add_argument("--calibrate", action="store_true", help="per-member temperature scaling on the selection split")
    p.add_argument("--selection-fraction", type=float, default=0.5,
                   help="part of the split held out for selection/calibration when used (default: %(default)s)")
    p.add_argument("--tta", choices=sorted(TTA_VIEWS), default="none",
                   help="per-member test-time augmentation (recomputes predictions from checkpoints)")
    p.add_argument("--random-orders", type=int, default=3, help="random orders averaged in the size curve")
    p.add_argument("--curve-samples", type=int, default=10_000,
                   help="rows the size curve is scored on (a seeded subset; default: %(default)s)")
    p.add_argument("--recompute", action="store_true", help="ignore cached predictions, run the checkpoints")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the MLflow parent run")
    p.add_argument("--log-model", action="store_true",
                   help="also log the ensemble as one MLflow pyfunc model (members, transforms, weights)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def member_predictions(m, ds, cached: str | None, args, what: str) -> MemberPredictions:
    """A member's rows on split `ds`: its cached file, or recomputed from its checkpoint."""
    if args.tta != "none" or args.recompute or not cached:
        return recompute(m, ds.uri, ds.split, ds.classes, ds.per_class, args.tta)
    return MemberPredictions(m.name, open_npy(cached, f"member {m.name} {what}", rows=True), "cached")


def load_members(runs: RunsFile, args) -> tuple[list, list[MemberPredictions]]:
    records, preds = [], []
    for m in runs.members:
        if m.status != "finished":
            print(f"warning: skipping member {m.name}: status {m.status} ({m.error or 'no error recorded'})",
                  file=sys.stderr)
            continue
        preds.append(member_predictions(m, runs.dataset, m.predictions, args, "predictions"))
        records.append(m)
    if not records:
        raise UserError(f"{args.members}: no finished members to evaluate")
    return records, preds


class Selection:
    """The rows that choose: each member's minival predictions, or held-out rows of the
    reported split (ensemble/protocol.py)."""

    def __init__(self, runs: RunsFile, records, preds, labels, proto: Protocol, args):
        if proto.on_minival:
            self.preds = [member_predictions(m, runs.minival, m.minival_predictions, args, "minival predictions")
                          for m in records]
            self.labels = np.asarray(open_npy(runs.minival.labels, "minival labels"), dtype=np.int64)
            self.rows = np.arange(len(self.labels))
            check_shapes(runs, self.preds, self.labels, "minival")
        else:
            self.preds, self.labels, self.rows = preds, labels[proto.selection], proto.selection

    def load(self, i: int):
        return self.preds[i].rows(self.rows)


def check_shapes(runs: RunsFile, preds: list[MemberPredictions], labels: np.ndarray, what: str = "") -> None:
    n, c = len(labels), runs.dataset.num_classes
    if labels.min() < 0 or labels.max() >= c:
        raise UserError(f"{what or 'dataset'} labels fall outside 0..{c - 1} (min {labels.min()}, max {labels.max()})")
    for p in preds:
        if p.array.ndim != 2:
            raise UserError(f"member {p.name}: predictions must be [N, C], got shape {p.array.shape}")
        if p.array.shape[1] != c:
            raise UserError(f"member {p.name}: {p.array.shape[1]} classes, but the dataset has {c}")
        if p.array.shape[0] != n:
            raise UserError(f"member {p.name}: {p.array.shape[0]} samples, but the {what + ' ' if what else ''}labels have {n}")


CHOSEN_ON = {"minival": "the minival", "held-out": "held-out rows of val", "val": "val (optimistic)"}


def choose_best(sel: Selection | None, proto: Protocol, m: int, reported_errors: list[dict]) -> dict:
    """The best member per metric, chosen where every other choice is made: on the
    minival, else on the held-out rows of val, else (nothing held out) on the reported
    rows themselves, which flatters it (an oracle choice; the report says so).
    Returns {"by": {k: member index}, "on": "minival" | "held-out" | "val", "errors": [...]}."""
    if sel is None:
        errors, on = [{k: r[f"top{k}_err"] for k in (1, 5)} for r in reported_errors], "val"
    else:
        errors = []
        for i in range(m):
            probs = sel.load(i)
            errors.append({k: em.topk_error(probs, sel.labels, k) for k in (1, 5)})
        on = "minival" if proto.on_minival else "held-out"
    by = {k: int(np.argmin([e[k] for e in errors])) for k in (1, 5)}  # ties: the first listed
    return {"by": by, "on": on, "samples": int(len(sel.labels)) if sel is not None else None, "errors": errors}


def fit_on_selection(records, sel: Selection, args) -> tuple[list, np.ndarray | None, dict | None]:
    """Temperatures and/or greedy weights, from the selection rows only."""
    m = len(records)
    temps = [None] * m
    if args.calibrate:
        temps = [em.fit_temperature(sel.load(i), sel.labels) for i in range(m)]
    transforms = [(lambda x, t=t: em.apply_temperature(x, t)) if t else None for t in temps]
    if args.select != "greedy":
        return transforms, None, ({"samples": int(len(sel.labels)), "temperatures": dict(zip([r.name for r in records],
                                  temps))} if args.calibrate else None)

    def load(i):
        rows = sel.load(i)
        return transforms[i](rows) if transforms[i] else rows

    rounds = args.select_rounds or 2 * m
    chosen, curve = em.greedy_selection(load, m, sel.labels, rounds, init=1, metric=args.select_metric,
                                        method=METHODS[args.method])
    weights = em.weights_from_selection(chosen, m)
    names = [r.name for r in records]
    selection = {"method": "greedy_with_replacement", "combination": METHODS[args.method],
                 "metric": args.select_metric, "samples": int(len(sel.labels)), "rounds": rounds,
                 "best_prefix": len(chosen), "order": [names[i] for i in chosen], "loss_curve": curve,
                 "weights": dict(zip(names, weights.tolist())),
                 "temperatures": dict(zip(names, temps)) if args.calibrate else None}
    return transforms, weights, selection


def curve_orders(chosen_errors, selection_order, m: int, n_random: int, seed: int):
    """The greedy order (first appearance in the selection) when selection ran, else members
    sorted by their own top-5 error where the best member is chosen (`choose_best`); plus
    `n_random` random orders."""
    if selection_order:
        first = list(dict.fromkeys(selection_order))
        rest = sorted(set(range(m)) - set(first), key=lambda i: chosen_errors[i][5])
        main, label = first + rest, "greedy"
    else:
        main, label = sorted(range(m), key=lambda i: chosen_errors[i][5]), "sorted"
    rng = np.random.default_rng(seed)
    return main, label, [list(rng.permutation(m)) for _ in range(n_random)]


def build_report(runs, records, preds, labels, args) -> tuple[dict, dict]:
    m = len(preds)
    check_shapes(runs, preds, labels)
    needs_selection = args.select == "greedy" or args.calibrate
    proto = protocol_for(runs, records, len(labels), needs_selection, args.selection_fraction, args.seed)
    rows = proto.reported
    sel = Selection(runs, records, preds, labels, proto, args) if proto.on_minival or proto.selection is not None \
        else None
    transforms, weights, selection = fit_on_selection(records, sel, args) if needs_selection else ([None] * m, None,
                                                                                                  None)
    if weights is None:
        weights = np.array([r.weight for r in records]) if args.method == "weighted" else np.ones(m)
    scored = score(preds, transforms, labels, rows, weights, METHODS[args.method])
    per_member = [{"name": r.name, **t.summary()} for r, t in zip(records, scored["members"])]
    best = choose_best(sel, proto, m, per_member)
    main, label, randoms = curve_orders(best["errors"], selection and
                                        [[r.name for r in records].index(n) for n in selection["order"]],
                                        m, args.random_orders, args.seed)
    # The curve costs (1 + random orders) x M passes; a 10k-row subset pins each point
    # to about +-0.5% (binomial s.e.) at a fifth of the cost on a 50k-row split.
    curve_rows = rows if len(rows) <= args.curve_samples else np.sort(
        np.random.default_rng(args.seed).choice(rows, args.curve_samples, replace=False))
    curves = size_curves(preds, transforms, labels, curve_rows, [main] + randoms)
    size_curve = []
    for k in range(m):
        entry = {"k": k + 1, "order": label, "member": records[main[k]].name,
                 "top1_err": float(curves[0][k, 0]), "top5_err": float(curves[0][k, 1])}
        if randoms:
            entry["random_top1_err"] = float(np.mean([c[k, 0] for c in curves[1:]]))
            entry["random_top5_err"] = float(np.mean([c[k, 1] for c in curves[1:]]))
        size_curve.append(entry)
    best_by = best["by"]
    used = [r.name for r, w in zip(records, weights) if w > 0]
    summary = scored["ensemble"].summary()
    ensemble = {"method": args.method, "members": used, **summary,
                "oracle_top1_err": scored["oracle_err"],
                "mean_pairwise_disagreement": float(scored["disagreement"][np.triu_indices(m, 1)].mean()) if m > 1
                else 0.0,
                "gain_top5_over_best": per_member[best_by[5]]["top5_err"] - summary["top5_err"],
                "gain_top1_over_best": per_member[best_by[1]]["top1_err"] - summary["top1_err"],
                "best_member_top1": per_member[best_by[1]]["name"], "best_member_top5": per_member[best_by[5]]["name"],
                "best_member_chosen_on": best["on"]}
    # 95% bootstrap intervals over the reported rows (ensemble/scoring.py: intervals)
    ci = intervals(scored["members"], scored["ensemble"], best_by, args.bootstrap, args.seed)
    for row, extra in zip(per_member, ci["members"]):
        row.update(extra)
    ensemble.update(ci["ensemble"])
    ds = runs.dataset
    report = {"dataset": {"name": ds.name, "split": ds.split, "samples": int(len(rows)), "num_classes": ds.num_classes},
              "protocol": proto.describe(runs),
              "members": per_member, "ensemble": ensemble,
              "best_member": {"name": per_member[best_by[5]]["name"], "top5_err": per_member[best_by[5]]["top5_err"],
                              "chosen_on": CHOSEN_ON[best["on"]], "chosen_samples": best["samples"]},
              "size_curve": size_curve, "size_curve_samples": int(len(curve_rows)), "selection": selection,
              "tta": {"mode": args.tta, "inference_cost": float(TTA_VIEWS[args.tta])},
              "disagreement": {"members": [r.name for r in records], "matrix": scored["disagreement"].tolist()}}
    return report, scored["ensemble"].reliability_curve()


def summarize(runs_path: str) -> dict:
    """What a training job ends with: its finished members and their plain ensemble (mean
    softmax of the cached predictions, nothing selected), as `ensemble.evaluate` reports it."""
    args = parse_args(["--members", runs_path, "--random-orders", "0", "--no-mlflow"])
    runs = load_runs(runs_path)
    labels = np.asarray(open_npy(runs.dataset.labels, "dataset labels"), dtype=np.int64)
    records, preds = load_members(runs, args)
    return build_report(runs, records, preds, labels, args)[0]


@exit_on_user_error
@exit_on_outage(lambda: "Kept: the report folder (--out), written before logging.")
def main(argv=None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.members)
    tracking_uri, parent = mlflow_target(runs)
    if not args.no_mlflow and parent:  # it will log: the server must answer before any work
        check_tracking(tracking_uri)
    labels = np.asarray(open_npy(runs.dataset.labels, "dataset labels"), dtype=np.int64)
    records, preds = load_members(runs, args)
    report, reliability = build_report(runs, records, preds, labels, args)
    rep.print_table(report)
    files = rep.write_folder(args.out, report, reliability)
    if args.json:
        rep.write_json(args.json, report)
    print(f"report: {args.out}/ ({', '.join(f.rsplit('/', 1)[-1] for f in files)})")
    if not args.no_mlflow:
        run = log_to_mlflow(runs, report, files)
        if run:
            print(f"logged to MLflow run {run}")
        if run and args.log_model:
            weights = [report["selection"]["weights"][r.name] for r in records] if report["selection"] and \
                report["selection"].get("weights") else [r.weight if args.method == "weighted" else 1.0 for r in records]
            sel = report["selection"] or {}
            uri = log_ensemble_model(runs, records, weights, run, tracking_uri, method=METHODS[args.method],
                                     temperatures=sel.get("temperatures"), tta=args.tta)
            print(f"ensemble model: {uri}  (mlflow.pyfunc.load_model(uri).predict(images))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
