"""Evaluation as a library: `evaluate(runs, options) -> Report`.

    from ensemble.core.evaluation import evaluate
    from ensemble.core.options import EvaluateOptions

    report = evaluate("runs.yaml", EvaluateOptions(select="greedy", calibrate=True))
    report.ensemble.top5_err, report.member("resnet18-s0").top1_err

Scores every finished member and the ensemble on the reported rows, with the gain over
the best member; selection and temperatures are fitted on the rows that choose (the
minival, or a held-out part of the split: ensemble/core/protocol.py), never on the reported
ones. `python -m ensemble.evaluate` is a thin CLI over it; the job's end calls it too.
"""
from __future__ import annotations

import sys

import numpy as np

from ensemble.core import math as em
from ensemble.core.costs import (BUDGETS, budget_costs, budget_points, ensemble_cost, front, member_fields,
                            subset_points)
from ensemble.core.options import EvaluateOptions
from ensemble.core.predictions import recompute
from ensemble.core.protocol import Protocol, protocol_for
from ensemble.core.results import Report
from ensemble.core.scoring import intervals, size_curves, score
from ensemble.core.stored import MemberPredictions, open_npy
from ensemble.core.tta import TTA_VIEWS
from orchestrator.base.errors import UserError, unknown_name
from orchestrator.records.runs_file import RunsFile, load_runs


def member_predictions(m, ds, cached: str | None, options, what: str) -> MemberPredictions:
    """A member's rows on split `ds`: its cached file, or recomputed from its checkpoint."""
    if options.tta != "none" or options.recompute or not cached:
        return recompute(m, ds.uri, ds.split, ds.classes, ds.per_class, options.tta)
    return MemberPredictions(m.name, open_npy(cached, f"member {m.name} {what}", rows=True), "cached")


def load_members(runs: RunsFile, options) -> tuple[list, list[MemberPredictions]]:
    for m in runs.members:
        if m.status != "finished":
            print(f"warning: skipping member {m.name}: status {m.status} ({m.error or 'no error recorded'})",
                  file=sys.stderr)
    records = runs.ensemble_members(with_roles=options.with_students or bool(options.only))
    if options.only:
        by_name = {m.name: m for m in records}
        unknown = [n for n in options.only if n not in by_name]
        if unknown:
            raise unknown_name("finished member (--only)", unknown[0], by_name)
        records = [by_name[n] for n in options.only]
    preds = [member_predictions(m, runs.dataset, m.predictions, options, "predictions") for m in records]
    if not records:
        raise UserError(f"{runs.ensemble}: no finished members to evaluate")
    return records, preds


class Selection:
    """The rows that choose: each member's minival predictions, or held-out rows of the
    reported split (ensemble/core/protocol.py)."""

    def __init__(self, runs: RunsFile, records, preds, labels, proto: Protocol, options):
        if proto.on_minival:
            self.preds = [member_predictions(m, runs.minival, m.minival_predictions, options, "minival predictions")
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


def fit_on_selection(records, sel: Selection, options) -> tuple[list, np.ndarray | None, dict | None]:
    """Temperatures and/or greedy weights, from the selection rows only."""
    m = len(records)
    temps = [None] * m
    if options.calibrate:
        temps = [em.fit_temperature(sel.load(i), sel.labels) for i in range(m)]
    transforms = [(lambda x, t=t: em.apply_temperature(x, t)) if t else None for t in temps]
    if options.select != "greedy":
        return transforms, None, ({"samples": int(len(sel.labels)), "temperatures": dict(zip([r.name for r in records],
                                  temps))} if options.calibrate else None)

    def load(i):
        rows = sel.load(i)
        return transforms[i](rows) if transforms[i] else rows

    rounds = options.select_rounds or 2 * m
    costs = budget_costs(records, options.budget[0], TTA_VIEWS[options.tta]) if options.budget else None
    try:
        chosen, curve = em.greedy_selection(load, m, sel.labels, rounds, init=1, metric=options.select_metric,
                                            method=options.combination, cost=costs,
                                            budget=options.budget[1] if options.budget else None)
    except ValueError as exc:
        raise UserError(f"--budget-{options.budget[0]}: {exc}") from None
    weights = em.weights_from_selection(chosen, m)
    names = [r.name for r in records]
    selection = {"method": "greedy_with_replacement", "combination": options.combination,
                 "metric": options.select_metric, "samples": int(len(sel.labels)), "rounds": rounds,
                 "best_prefix": len(chosen), "order": [names[i] for i in chosen], "loss_curve": curve,
                 "weights": dict(zip(names, weights.tolist())),
                 "temperatures": dict(zip(names, temps)) if options.calibrate else None}
    if costs is not None:  # what the budget cost: the same selection without it
        free, _ = em.greedy_selection(load, m, sel.labels, rounds, init=1, metric=options.select_metric,
                                      method=options.combination)
        selection["budget"] = {"kind": options.budget[0], "limit": options.budget[1],
                               "cost": em.ensemble_cost(costs, chosen), "unbudgeted_cost": em.ensemble_cost(costs, free),
                               "unbudgeted_weights": em.weights_from_selection(free, m).tolist()}
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


def build_report(runs, records, preds, labels, options) -> tuple[dict, dict]:
    m = len(preds)
    check_shapes(runs, preds, labels)
    needs_selection = options.select == "greedy" or options.calibrate
    proto = protocol_for(runs, records, len(labels), needs_selection, options.selection_fraction, options.seed)
    rows = proto.reported
    sel = Selection(runs, records, preds, labels, proto, options) if proto.on_minival or proto.selection is not None \
        else None
    transforms, weights, selection = fit_on_selection(records, sel, options) if needs_selection else ([None] * m, None,
                                                                                                  None)
    if weights is None:
        weights = np.array([r.weight for r in records]) if options.method == "weighted" else np.ones(m)
    scored = score(preds, transforms, labels, rows, weights, options.combination)
    views = float(TTA_VIEWS[options.tta])
    per_member = [{"name": r.name, **t.summary(), **member_fields(r, views)} for r, t in zip(records, scored["members"])]
    best = choose_best(sel, proto, m, per_member)
    main, label, randoms = curve_orders(best["errors"], selection and
                                        [[r.name for r in records].index(n) for n in selection["order"]],
                                        m, options.random_orders, options.seed)
    # The curve costs (1 + random orders) x M passes; a 10k-row subset pins each point
    # to about +-0.5% (binomial s.e.) at a fifth of the cost on a 50k-row split.
    curve_rows = rows if len(rows) <= options.curve_samples else np.sort(
        np.random.default_rng(options.seed).choice(rows, options.curve_samples, replace=False))
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
    ensemble = {"method": options.method, "members": used, **summary,
                "oracle_top1_err": scored["oracle_err"],
                "mean_pairwise_disagreement": float(scored["disagreement"][np.triu_indices(m, 1)].mean()) if m > 1
                else 0.0,
                "gain_top5_over_best": per_member[best_by[5]]["top5_err"] - summary["top5_err"],
                "gain_top1_over_best": per_member[best_by[1]]["top1_err"] - summary["top1_err"],
                "best_member_top1": per_member[best_by[1]]["name"], "best_member_top5": per_member[best_by[5]]["name"],
                "best_member_chosen_on": best["on"]}
    ensemble["cost"] = ensemble_cost(per_member, used)
    if selection and selection.get("budget"):
        free = score(preds, transforms, labels, rows, np.array(selection["budget"].pop("unbudgeted_weights")),
                     options.combination)["ensemble"].summary()
        selection["budget"].update(unbudgeted_top1_err=free["top1_err"], unbudgeted_top5_err=free["top5_err"],
                                   top1_err_cost=summary["top1_err"] - free["top1_err"],
                                   top5_err_cost=summary["top5_err"] - free["top5_err"])
    # 95% bootstrap intervals over the reported rows (ensemble/core/scoring.py: intervals)
    ci = intervals(scored["members"], scored["ensemble"], best_by, options.bootstrap, options.seed)
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
              "tta": {"mode": options.tta, "inference_cost": float(TTA_VIEWS[options.tta])},
              "disagreement": {"members": [r.name for r in records], "matrix": scored["disagreement"].tolist()},
              "accuracy_cost": accuracy_cost(per_member, size_curve, preds, transforms, labels, curve_rows)}
    return Report(**report, reliability=scored["ensemble"].reliability_curve())


def accuracy_cost(per_member: list[dict], size_curve: list[dict], preds, transforms, labels,
                  rows) -> dict | None:
    """Members, the ensembles along the report's order, every subset when few, and the
    front of top-1 error against multiply-adds (ensemble/core/costs.py); None without costs."""
    if any(r.get("macs") is None for r in per_member):
        return None
    names = [r["name"] for r in per_member]
    by = {r["name"]: r for r in per_member}
    points = [{"name": r["name"], "members": [r["name"]], "top1_err": r["top1_err"], "macs": r["macs"],
               "param_count": r["param_count"] or 0} for r in per_member]
    path = []
    for step in size_curve[1:]:
        kept = [s["member"] for s in size_curve[:step["k"]]]
        path.append({"name": f"first {step['k']}", "members": kept, "top1_err": step["top1_err"],
                     "macs": sum(by[n]["macs"] for n in kept), "param_count": sum(by[n]["param_count"] or 0 for n in kept)})
    costs = [r["macs"] for r in per_member], [r["param_count"] or 0 for r in per_member]
    subsets = subset_points(preds, transforms, labels, rows, names, *costs)
    if subsets:
        return {"members": points, "path": path, "front": front(points + subsets), "front_from": "every subset"}
    budgeted = budget_points(preds, transforms, labels, rows, names, *costs)
    return {"members": points, "path": path, "budgeted": budgeted, "front": front(points + path + budgeted),
            "front_from": f"budgeted selections ({len(budgeted)} distinct of {BUDGETS} budgets) and the ensembles "
                          "along the order"}


def evaluate(runs: RunsFile | str, options: EvaluateOptions = EvaluateOptions()) -> Report:
    """Every finished member of `runs` (a RunsFile, or its path or URL) and their ensemble,
    scored as `options` says: the library call behind `python -m ensemble.evaluate`. Logs
    nothing; `publish` writes and logs a report."""
    runs = load_runs(runs) if isinstance(runs, str) else runs
    labels = np.asarray(open_npy(runs.dataset.labels, "dataset labels"), dtype=np.int64)
    records, preds = load_members(runs, options)
    return build_report(runs, records, preds, labels, options)


def summarize(runs_path: str) -> Report:
    """What a training job ends with: its finished members and their plain ensemble (mean
    softmax of the cached predictions, nothing selected)."""
    return evaluate(runs_path, EvaluateOptions(random_orders=0, log_mlflow=False))
