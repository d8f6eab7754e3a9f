"""Caruana's selection at search scale: each member loaded once against loaded every round.

    .venv/bin/python bench/select_bench.py                    # 100 members x 10,000 rows x 1,000 classes
    .venv/bin/python bench/select_bench.py --members 24 --rows 2000 --classes 200

Writes `--members` synthetic members' selection-row probabilities as .npy files (float32,
as `ensemble.evaluate` and the search read them), then times, in this one run:
- `ensemble.core.math.greedy_selection` with the defaults of `ensemble.evaluate --select greedy`
  (mean combination, NLL, 2 x M rounds): each file read once;
- the same selection reading every candidate's file in every round (as it was written
  before), for `--old-rounds` rounds; its whole time is that per-round cost times the
  rounds, plus its start (the M loads of the sorted initialisation).
Both must pick the same members in the same order (over the picks both made). Prints each
time and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ensemble.core import math as em  # noqa: E402


def write_members(folder: str, members: int, rows: int, classes: int, seed: int) -> np.ndarray:
    """Members that are right on 40-70% of rows, each in its own way; returns the labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    for i in range(members):
        logits = torch.randn(rows, classes, generator=gen) * 2
        right = torch.rand(rows, generator=gen) < 0.4 + 0.3 * i / max(1, members - 1)
        logits[right, labels[right]] += 6
        np.save(os.path.join(folder, f"m{i:03d}.npy"), logits.softmax(1).numpy())
        if (i + 1) % 25 == 0 or i + 1 == members:
            print(f"wrote member {i + 1}/{members}", flush=True)
    return labels.numpy()


def per_round(load, members: int, labels, rounds: int) -> tuple[float, float, list[int]]:
    """(start seconds, seconds per round, picks) of the selection that loads every
    candidate in every round."""
    begin = time.perf_counter()
    own = [em.selection_loss(load(i), labels, "nll") for i in range(members)]
    chosen = sorted(range(members), key=own.__getitem__)[:1]
    comb = em.Combiner("mean")
    comb.add(load(chosen[0]))
    start = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(rounds):
        losses = [em.selection_loss(comb.result_with(load(i)), labels, "nll") for i in range(members)]
        best = int(np.argmin(losses))
        chosen.append(best)
        comb.add(load(best))
    return start, (time.perf_counter() - begin) / rounds, chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=1_000)
    p.add_argument("--old-rounds", type=int, default=3, help="rounds of the per-round loader to time")
    p.add_argument("--dir", help="where to write the member files (default: a temporary folder, removed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rounds = 2 * args.members
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        gib = args.members * args.rows * args.classes * 4 / 2**30
        print(f"{args.members} members x {args.rows:,} rows x {args.classes:,} classes ({gib:.1f} GiB of float32), "
              f"{rounds} rounds (mean, NLL)")
        labels = write_members(folder, args.members, args.rows, args.classes, args.seed)
        loads = [0]

        def load(i):
            loads[0] += 1
            return np.load(os.path.join(folder, f"m{i:03d}.npy"))

        begin = time.perf_counter()
        chosen, _ = em.greedy_selection(load, args.members, labels, rounds, init=1, metric="nll")
        held = time.perf_counter() - begin
        print(f"each member loaded once: {held:.1f} s ({loads[0]} loads)")
        start, each, picks = per_round(load, args.members, labels, args.old_rounds)
        old = start + each * rounds
        same = min(len(chosen), len(picks))
        if chosen[:same] != picks[:same]:
            raise SystemExit(f"error: the two selections disagree: {chosen[:same]} vs {picks[:same]}")
        print(f"loaded every round: {old:.0f} s ({start:.1f} s start + {each:.1f} s per round, timed over "
              f"{args.old_rounds} rounds, x {rounds}; {args.members * (rounds + 2):,} loads)")
        print(f"chosen: {len(set(chosen))} distinct members in a best prefix of {len(chosen)} picks")
        print(f"per-round loading / loading once: {old / held:.1f}x")


if __name__ == "__main__":
    main()
