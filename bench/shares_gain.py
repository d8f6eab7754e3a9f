"""What `data.shares` does to the first command's ensemble gain, over several draws of seeds.

    python bench/shares_gain.py --draws 3        # configs/default.yaml: 24 members, 26 min on 2 CPUs
    python bench/shares_gain.py                  # 4 draws, 32 members

One draw is the default job's four members with every seed moved by 100 x draw (draw 0
is the shipped job), trained twice by the platform's Ray-free core, two at a time: once as
configured (each member on its own share of train) and once with every member on the same
images (no shares; train_per_class = minival + one share). The best member is the one
with the lowest minival error (as every report chooses it), and the gain is over its val
error. One ensemble's gain over its best member is one draw of a noisy figure (n = 1,000
val images); the mean over draws, and over every combination that takes each member
position from any draw, says what the design gives. Prints one line per draw and design,
then the means (`--draws 3`, 2-CPU VM, 26 min):

    shares 4  draw 0: members 61.0 60.9 64.1 66.2  ensemble 58.3  gain over best (member 1, chosen on the minival) +2.60 over mean +4.75
    ...
    shares 4  mean over 3 draws +3.23; over 81 combinations +3.88, >= 2 points in 100%
    same data mean over 3 draws +2.03; over 81 combinations +1.47, >= 2 points in 38%
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(job: tuple) -> tuple:
    """(design, draw, position, (val probabilities, minival probabilities, minival labels))
    of one member (each design carves its minival from its own train subset)."""
    import torch

    from orchestrator.config import load_config, resolve_members
    from orchestrator.train.member import assemble_predictions, open_member_data, predict, split_labels, train_member

    config, design, draw, i = job
    torch.set_num_threads(1)
    cfg = with_design(load_config(config), design)
    member = resolve_members(cfg)[i]
    member = member.model_copy(update={"seed": member.seed + 100 * draw})
    data = open_member_data(cfg.data, member.share)
    cpu = torch.device("cpu")
    model, _ = train_member(member, data, device=cpu)
    probs = [assemble_predictions([predict(model, split, member, cpu)], len(split)) for split in (data.val, data.minival)]
    return design, draw, i, (*probs, split_labels(data.minival))


def with_design(cfg, design: str):
    """`shares`: as configured; `same`: every member on the images of one share."""
    if design == "shares":
        return cfg
    d = cfg.data
    one_share = int(d.member_per_class(d.train_per_class))
    return cfg.model_copy(update={"data": d.model_copy(update={"shares": None,
                                                                "train_per_class": one_share + (d.minival or 0)})})


def top1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 error in percent, by the one rule every report uses (ensemble.core.math)."""
    from ensemble.core.math import topk_error

    return 100 * topk_error(probs, labels, 1)


def gains(members: list[tuple], labels: np.ndarray) -> tuple[list[float], int, float, float, float]:
    """Members' val errors, the best member (chosen on the minival, as every report chooses
    it), the ensemble's val error and its gain over that member and over the members' mean."""
    errs = [top1(val, labels) for val, _, _ in members]
    best = int(np.argmin([top1(held, held_labels) for _, held, held_labels in members]))
    ens = top1(np.mean([val for val, _, _ in members], 0), labels)
    return errs, best, ens, errs[best] - ens, float(np.mean(errs)) - ens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()

    from orchestrator.config import load_config, resolve_members
    from orchestrator.train.member import open_member_data, split_labels

    cfg = load_config(args.config)
    if not cfg.data.shares:
        sys.exit(f"{args.config} has no data.shares: nothing to compare")
    n = len(resolve_members(cfg))
    if not cfg.data.minival:
        sys.exit(f"{args.config} has no data.minival: the best member is chosen on it")
    labels = split_labels(open_member_data(cfg.data).val)
    jobs = [(args.config, design, draw, i) for draw in range(args.draws) for design in ("shares", "same")
            for i in range(n)]
    probs: dict = {}
    with ProcessPoolExecutor(args.processes, mp_context=mp.get_context("spawn")) as pool:
        for k, (design, draw, i, pr) in enumerate(pool.map(train, jobs), 1):
            probs[design, draw, i] = pr
            print(f"[{k}/{len(jobs)}] {design} draw {draw} member {i}: val top-1 {top1(pr[0], labels):.1f}%, "
                  f"minival {top1(pr[1], pr[2]):.1f}%", flush=True)
    for design in ("shares", "same"):
        name = f"shares {cfg.data.shares}" if design == "shares" else "same data"
        per_draw = []
        for draw in range(args.draws):
            errs, best, ens, over_best, over_mean = gains([probs[design, draw, i] for i in range(n)], labels)
            per_draw.append(over_best)
            print(f"{name:9s} draw {draw}: members {' '.join(f'{e:.1f}' for e in errs)}  ensemble {ens:.1f}  "
                  f"gain over best (member {best}, chosen on the minival) {over_best:+.2f} over mean {over_mean:+.2f}")
        combos = [gains([probs[design, d, i] for i, d in enumerate(pick)], labels)[3]
                  for pick in itertools.product(range(args.draws), repeat=n)]
        print(f"{name:9s} mean over {args.draws} draws {np.mean(per_draw):+.2f}; over {len(combos)} combinations "
              f"{np.mean(combos):+.2f}, >= 2 points in {np.mean(np.array(combos) >= 2):.0%}")


if __name__ == "__main__":
    main()
