"""Which search trials become ensemble members: by their own error, or by what they add.

The top-k trials by their own error tend to be near-copies of one configuration; an
ensemble gains most from members that are good *and* different (Hansen & Salamon 1990;
Caruana et al. 2004). The second choice is the one selection algorithm of the platform,
`ensemble.core.math.greedy_selection` (the one `ensemble.evaluate --select greedy` runs):
Caruana's forward steps with replacement, kept to the best prefix; a trial picked k
times becomes one member of weight k (`--method weighted` reproduces the combination
chosen). At most `select.size` picks, so at most that many members. Both choices are made from the trials' cached predictions (no
retraining, no data read) on the minival when the config has one, reported on all of
val; without one, on a seeded part of val, reported on the rest (the runs file records
which rows, so `ensemble.evaluate` never reports them either). Predictions are streamed
as `ensemble.evaluate` streams them: `LazyArrays` reads a trial's file when it is used,
so the driver holds one trial's predictions and the running combination, whatever the
number of trials (a 1,000-class, 50,000-row float32 file is 200 MB).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensemble.core.math import combine, greedy_selection, topk_error
from ensemble.core.protocol import split_rows


class LazyArrays(Sequence):
    """The arrays at `urls`, each read when indexed (nothing kept)."""

    def __init__(self, urls: list[str], read):
        self.urls, self.read = list(urls), read

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(self.urls[i])


def _ensemble_errors(preds: Sequence[np.ndarray], chosen: list[int], labels: np.ndarray, rows: np.ndarray,
                     own: list[float], weights: list[float] | None = None) -> dict:
    """The choice's ensemble on the reported rows, and its best member: the one with the
    lowest top-1 error on the rows that chose (`own`), reported on these rows."""
    probs = combine((preds[i][rows] for i in chosen), weights)  # one member at a time
    best = min(chosen, key=lambda i: own[i])
    return {"top1_err": topk_error(probs, labels[rows], 1), "top5_err": topk_error(probs, labels[rows], 5),
            "best_member": best, "best_member_top1_err": topk_error(preds[best][rows], labels[rows], 1)}


def compare(preds: Sequence[np.ndarray], labels: np.ndarray, size: int, metric: str, fraction: float,
            seed: int = 0, selection: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
            cost: Sequence[float] | None = None, budget: float | None = None) -> dict:
    """{"topk": {...}, "greedy": {...}, "selection_rows", "report_rows"}: each choice's
    trial indices and its ensemble's errors on the reported rows. `selection`: (each
    trial's minival predictions, minival labels) to choose on; else a part of `preds`.
    `cost` and `budget` bound Caruana's choice as `ensemble.evaluate --budget-macs` does."""
    if selection is not None:
        held, sel_labels = selection
        rows = np.arange(len(labels))
        n_sel = len(sel_labels)

        def chooser(i):
            return held[i]
    else:
        sel, rows = split_rows(len(labels), fraction, seed)
        sel_labels, n_sel = labels[sel], len(sel)

        def chooser(i):
            return preds[i][sel]
    own = [topk_error(chooser(i), sel_labels, 1) for i in range(len(preds))]
    topk = [int(i) for i in np.argsort(own, kind="stable")[:size]]
    picks, curve = greedy_selection(chooser, len(preds), sel_labels, rounds=size - 1, init=1, metric=metric,
                                    cost=cost, budget=budget)
    greedy = list(dict.fromkeys(picks))  # distinct, in the order first picked
    weights = [float(picks.count(i)) for i in greedy]
    return {"topk": {"chosen": topk, "weights": [1.0] * len(topk), **_ensemble_errors(preds, topk, labels, rows, own)},
            "greedy": {"chosen": greedy, "weights": weights, "picks": picks, "selection_curve": curve,
                       **({"cost": float(sum(cost[i] for i in greedy)), "budget": budget} if budget else {}),
                       **_ensemble_errors(preds, greedy, labels, rows, own, weights)},
            "selection_rows": n_sel, "report_rows": len(rows)}
