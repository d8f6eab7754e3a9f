"""Reproducibility: the same config and seeds trained twice give the same member predictions.

    python bench/compare_runs.py A/runs.yaml B/runs.yaml               # bitwise (CPU)
    python bench/compare_runs.py A/runs.yaml B/runs.yaml --tolerance 0.002   # a GPU

For each member of both runs files: the largest absolute difference of its softmax rows
and of its top-1 and top-5 error. Bitwise (the default) means equal arrays; with
`--tolerance`, the members' errors may differ by at most that much (cuDNN's fastest
kernels are not deterministic). Exit status 1 when a member differs beyond it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ensemble.core.math import true_class_rank  # noqa: E402
from orchestrator.records.runs_file import load_runs  # noqa: E402


def errors(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    rank = true_class_rank(probs.astype(np.float64), labels).numpy()
    return float((rank >= 1).mean()), float((rank >= 5).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest error difference allowed (default: bitwise)")
    args = p.parse_args()
    a, b = load_runs(args.first), load_runs(args.second)
    theirs = {m.name: m for m in b.members}
    common = [m for m in a.members if m.name in theirs]
    if not common:
        print(f"error: {args.first} and {args.second} share no member name", file=sys.stderr)
        raise SystemExit(2)
    labels = np.load(a.dataset.labels)
    worst = 0.0
    for m in common:
        x, y = np.load(m.predictions), np.load(theirs[m.name].predictions)
        same = x.shape == y.shape and np.array_equal(x, y)
        (a1, a5), (b1, b5) = errors(x, labels), errors(y, labels)
        diff = max(abs(a1 - b1), abs(a5 - b5))
        worst = max(worst, 0.0 if same else diff if args.tolerance else 1.0)
        print(f"{m.name}: {'bitwise equal' if same else f'max |dp| {np.abs(x - y).max():.3g}'}; "
              f"top-1 {a1:.4f} vs {b1:.4f}, top-5 {a5:.4f} vs {b5:.4f}")
    ok = worst <= args.tolerance
    rule = f"error differences within {args.tolerance}" if args.tolerance else "bitwise equal"
    print(f"reproducible: {'yes' if ok else 'NO'} ({len(common)} members, {rule})")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
