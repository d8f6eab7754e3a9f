"""Score members and their combination over the reported rows, block by block.

All members' rows of one block are in memory at a time (block size ~ N / M), so memory
is O(N x C) whatever the number of members, while each member file is read sequentially.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ensemble.core import math as em
from ensemble.core.stored import MemberPredictions, check_block

BINS = 15


@dataclass
class Tally:
    """Running sums for one set of predictions (a member, or a combination)."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    nll: float = 0.0
    bins: list = field(default_factory=lambda: [np.zeros(BINS), np.zeros(BINS), np.zeros(BINS)])
    ranks: list = field(default_factory=list)  # per-row rank of the true class, for the bootstrap

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tally a block; returns (top-1 correct, top-1 class) per row."""
        p_true = probs.gather(1, labels.view(-1, 1))
        rank = em.rank_of(probs, p_true)  # em.true_class_rank, sharing p_true with the NLL
        top = probs.max(1)
        self.n += len(labels)
        self.top1 += int((rank < 1).sum())
        self.top5 += int((rank < 5).sum())
        self.nll += -p_true.clamp_min(em.EPS).log().sum().item()
        self.ranks.append(rank)
        for acc, part in zip(self.bins, em.reliability(probs, labels, BINS, top=top)):
            acc += part
        return rank < 1, top.indices

    def summary(self) -> dict:
        return {"top1_err": 1 - self.top1 / self.n, "top5_err": 1 - self.top5 / self.n, "nll": self.nll / self.n,
                "ece": em.ece_from_bins(*self.bins)}

    def misses(self, k: int) -> np.ndarray:
        """Per reported row: 1 where the true class is not in the top-k."""
        return (torch.cat(self.ranks) >= k).numpy().astype(np.float64)

    def reliability_curve(self) -> dict:
        conf, correct, count = self.bins
        safe = np.maximum(count, 1)
        return {"confidence": (conf / safe).tolist(), "accuracy": (correct / safe).tolist(), "count": count.tolist()}


def blocks(rows: np.ndarray, n_members: int, target: int = 4096):
    """Row-index blocks: about N / M rows each (so M blocks of rows ~ one [N, C] array)."""
    size = int(np.clip(len(rows) // max(n_members, 1), 256, target))
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def load_block(members: list[MemberPredictions], idx: np.ndarray, transforms) -> list[torch.Tensor]:
    out = []
    for m, tf in zip(members, transforms):
        block = m.rows(idx)
        check_block(m.name, block, idx)
        out.append(tf(block) if tf else block)
    return out


def score(members, transforms, labels: np.ndarray, rows: np.ndarray, weights: np.ndarray,
          method: str) -> dict:
    """Per-member tallies, the combination's tally, oracle and pairwise disagreement."""
    m = len(members)
    per_member, combined = [Tally() for _ in range(m)], Tally()
    oracle_wrong, disagree, n = 0, np.zeros((m, m)), 0
    for idx in blocks(rows, m):
        y = torch.from_numpy(labels[idx]).long()
        probs = load_block(members, idx, transforms)
        right, top1 = map(torch.stack, zip(*(t.add(p, y) for t, p in zip(per_member, probs))))
        oracle_wrong += em.oracle_misses(right)
        disagree += em.disagreement_counts(top1)
        comb = em.Combiner(method)
        for p, w in zip(probs, weights):
            if w > 0:
                comb.add(p, float(w))
        combined.add(comb.result(), y)
        n += len(idx)
    return {"members": per_member, "ensemble": combined, "oracle_err": oracle_wrong / n,
            "disagreement": disagree / n}


def size_curves(members, transforms, labels, rows, orders: list[list[int]]) -> list[np.ndarray]:
    """Top-1 and top-5 error of the mean of the first k members of each order, k = 1..M:
    one array [M, 2] per order."""
    m = len(members)
    correct = [np.zeros((len(o), 2)) for o in orders]
    for idx in blocks(rows, m):
        y = torch.from_numpy(labels[idx]).long()
        probs = load_block(members, idx, transforms)
        for order, acc in zip(orders, correct):
            running = torch.zeros_like(probs[0])
            for k, i in enumerate(order):
                running += probs[i]
                rank = em.true_class_rank(running, y)  # the sum ranks like the mean
                acc[k] += [(rank < 1).sum().item(), (rank < 5).sum().item()]
    return [1 - c / len(rows) for c in correct]


def intervals(members: list[Tally], combined: Tally, best: dict[int, int], n_boot: int = 1000,
              seed: int = 0) -> dict:
    """95% bootstrap intervals (ensemble.core.math.bootstrap_ci, shared resamples) for each
    member's and the ensemble's top-1/top-5 error, and for the ensemble's gain over the
    best member on each metric (`best`: k -> member index), a paired difference."""
    cols, names = [], []
    for k in (1, 5):
        for i, t in enumerate(members):
            cols.append(t.misses(k))
            names.append(("member", i, f"top{k}_err"))
        cols.append(combined.misses(k))
        names.append(("ensemble", None, f"top{k}_err"))
        cols.append(members[best[k]].misses(k) - combined.misses(k))
        names.append(("ensemble", None, f"gain_top{k}_over_best"))
    ci = em.bootstrap_ci(np.stack(cols, 1), n_boot, seed)
    out: dict = {"members": [{} for _ in members], "ensemble": {}}
    for (who, i, key), (lo, hi) in zip(names, ci):
        target = out["members"][i] if who == "member" else out["ensemble"]
        target[f"{key}_ci"] = [float(lo), float(hi)]
    return out
