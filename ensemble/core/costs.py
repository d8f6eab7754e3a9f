"""What members and ensembles cost to run, and accuracy against that cost.

A member's record carries its inference cost, measured when it finished training
(models/cost.py): multiply-adds per view at its evaluation geometry, milliseconds an image
at batch 1, images/s at batch 64, peak memory, and the machine. With test-time
augmentation each figure scales by the views. An ensemble costs the sum over the distinct
members it keeps (every member runs on every image). The accuracy-cost front is Canziani,
Paszke and Culurciello's figure (2016): top-1 error against multiply-adds; the front is
every subset's mean-softmax ensemble when there are few members (`MAX_SUBSETS`,
`EXHAUSTIVE_WORK`), else Caruana's selection under budgets spaced from the cheapest member
to all of them (as AutoGluon expands its front with `infer_limit`), with the members and the
ensembles along the report's order.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from ensemble.core import math as em
from ensemble.core.scoring import blocks, load_block
from orchestrator.base.errors import UserError

EXHAUSTIVE_WORK = 2e9  # subsets x rows x classes scored for the exhaustive front (seconds on a CPU)
MAX_SUBSETS = 2 ** 12 - 13  # every ensemble of 2 to 12 members: ~50 us of Python each per block
BUDGETS = 8  # budgeted selections drawn when the subsets are too many


def macs_words(macs: float) -> str:
    """1.3e9 -> '1.3 G': multiply-adds as people write them."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3g} {unit}"
    return f"{macs:.3g}"


def member_fields(record, views: float) -> dict:
    """timm's per-model validation fields and the stored inference cost (x `views` with TTA)."""
    m = record.metrics
    out = {"param_count": int(m["params"]) if "params" in m else None, "img_size": record.eval.input_size,
           "crop_pct": record.eval.crop / record.eval.resize}
    if "macs" in m:
        out.update(macs=m["macs"] * views, infer_ms_b1=m.get("infer_ms_b1", float("nan")) * views,
                   infer_images_per_s_b64=m.get("infer_images_per_s_b64", float("nan")) / views,
                   infer_peak_mb=m.get("infer_peak_mb"), cost_machine=record.cost_machine)
    return out


def budget_costs(records, kind: str, views: float) -> list[float]:
    """Each member's cost in the budget's unit: multiply-adds, or ms an image at batch 1."""
    key = "macs" if kind == "macs" else "infer_ms_b1"
    missing = [r.name for r in records if key not in r.metrics]
    if missing:
        raise UserError(f"member {missing[0]} has no stored inference cost ({key}; recorded by members trained "
                        f"since costs were kept): drop --budget-{kind} or re-train it ({len(missing)} without)")
    return [r.metrics[key] * views for r in records]


def ensemble_cost(rows: list[dict], used: list[str]) -> dict | None:
    """The ensemble's cost: the sum over its distinct members (None when one has no cost)."""
    mine = [r for r in rows if r["name"] in set(used)]
    if not mine or any(r.get("macs") is None for r in mine):
        return None
    return {"macs": sum(r["macs"] for r in mine), "param_count": sum(r["param_count"] or 0 for r in mine),
            "infer_ms_b1": sum(r["infer_ms_b1"] for r in mine),
            "infer_images_per_s_b64": 1 / sum(1 / r["infer_images_per_s_b64"] for r in mine)}


def front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both cost and top-1 error, cheapest first."""
    out, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["macs"], p["top1_err"])):
        if p["top1_err"] < best:
            out.append(p)
            best = p["top1_err"]
    return out


def subset_points(preds, transforms, labels, rows, names: list[str], macs: list[float],
                  params: list[int]) -> list[dict] | None:
    """Every subset's mean-softmax ensemble on `rows`: its top-1 error, cost and members;
    None when that is more than EXHAUSTIVE_WORK to score."""
    m = len(preds)
    count = 2 ** m - m - 1  # counted before they are listed: 23 members are 8.4 million subsets
    if not 0 < count <= MAX_SUBSETS or count * len(rows) * preds[0].array.shape[1] > EXHAUSTIVE_WORK:
        return None
    subsets = [s for k in range(2, m + 1) for s in combinations(range(m), k)]
    wrong = np.zeros(len(subsets))
    for idx in blocks(rows, m):
        y = torch.from_numpy(labels[idx]).long()
        probs = load_block(preds, idx, transforms)
        for j, s in enumerate(subsets):
            wrong[j] += (em.true_class_rank(sum(probs[i] for i in s), y) >= 1).sum().item()
    return [{"name": " + ".join(names[i] for i in s), "members": [names[i] for i in s],
             "top1_err": float(wrong[j] / len(rows)), "macs": float(sum(macs[i] for i in s)),
             "param_count": int(sum(params[i] for i in s))} for j, s in enumerate(subsets)]


def budget_points(preds, transforms, labels, rows, names: list[str], macs: list[float],
                  params: list[int]) -> list[dict]:
    """Caruana's selection (mean softmax, NLL, with replacement) on `rows` within each of
    BUDGETS multiply-add budgets spaced geometrically from the cheapest member to all of
    them: each distinct choice's top-1 error (its weighted mean), cost and members."""
    m, y = len(preds), labels[rows]

    def load(i):
        return load_block([preds[i]], rows, [transforms[i]])[0]

    chosen = []
    for budget in np.geomspace(min(macs), sum(macs), BUDGETS):
        picks, _ = em.greedy_selection(load, m, y, 2 * m, cost=macs, budget=float(budget))
        weights = em.weights_from_selection(picks, m)
        if not any(np.array_equal(weights, w) for w in chosen):
            chosen.append(weights)
    out = []
    for w in chosen:
        kept = [i for i in range(m) if w[i] > 0]
        wrong = 0
        for idx in blocks(rows, m):
            probs = load_block([preds[i] for i in kept], idx, [transforms[i] for i in kept])
            combined = sum(float(w[i]) * p for i, p in zip(kept, probs))
            wrong += int((em.true_class_rank(combined, torch.from_numpy(labels[idx]).long()) >= 1).sum())
        out.append({"name": f"within {macs_words(sum(macs[i] for i in kept))}", "members": [names[i] for i in kept],
                    "top1_err": wrong / len(rows), "macs": float(sum(macs[i] for i in kept)),
                    "param_count": int(sum(params[i] for i in kept))})
    return out
