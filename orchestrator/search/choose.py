"""Which search trials become ensemble members: by their own error, or by what they add.

The top-k trials by their own error tend to be near-copies of one configuration; an
ensemble gains most from members that are good *and* different (Hansen & Salamon 1990;
Caruana et al. 2004). Both choices are made from the trials' cached predictions (no
retraining, no data read) on the minival when the config has one, reported on all of
val; without one, on a seeded part of val, reported on the rest (the runs file records
which rows, so `ensemble.evaluate` never reports them either).
"""
from __future__ import annotations

import numpy as np

from ensemble.protocol import split_rows
from ensemble.math import combine, forward_selection, topk_error


def _ensemble_errors(preds: list[np.ndarray], chosen: list[int], labels: np.ndarray, rows: np.ndarray) -> dict:
    probs = combine([preds[i][rows] for i in chosen])
    best = min(topk_error(preds[i][rows], labels[rows], 1) for i in chosen)
    return {"top1_err": topk_error(probs, labels[rows], 1), "top5_err": topk_error(probs, labels[rows], 5),
            "best_member_top1_err": best}


def compare(preds: list[np.ndarray], labels: np.ndarray, size: int, metric: str, fraction: float,
            seed: int = 0, selection: tuple[list[np.ndarray], np.ndarray] | None = None) -> dict:
    """{"topk": {...}, "greedy": {...}, "selection_rows", "report_rows"}: each choice's
    trial indices and its ensemble's errors on the reported rows. `selection`: (each
    trial's minival predictions, minival labels) to choose on; else a part of `preds`."""
    if selection is not None:
        chooser, sel_labels = selection
        rows = np.arange(len(labels))
        n_sel = len(sel_labels)
    else:
        sel, rows = split_rows(len(labels), fraction, seed)
        chooser, sel_labels, n_sel = [p[sel] for p in preds], labels[sel], len(sel)
    own = [topk_error(p, sel_labels, 1) for p in chooser]
    topk = [int(i) for i in np.argsort(own, kind="stable")[:size]]
    greedy, curve = forward_selection(lambda i: chooser[i], len(preds), sel_labels, size, metric)
    return {"topk": {"chosen": topk, **_ensemble_errors(preds, topk, labels, rows)},
            "greedy": {"chosen": greedy, "selection_curve": curve, **_ensemble_errors(preds, greedy, labels, rows)},
            "selection_rows": n_sel, "report_rows": len(rows)}
