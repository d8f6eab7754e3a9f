"""Does an ensemble's measured inference speed follow its multiply-adds?

For the members of a config (default: configs/default.yaml, the first command's job), in
this process at batch 64 on this machine: each member's images/s alone, and the
ensemble's (every member on the same batch, one after another, as serving runs it).
Prints the ratio of the ensemble's images/s to its best member's beside the ratio of
their multiply-adds (models/cost.py), and how far apart they are (goal: within 1.5x).
Weights do not change the cost, so members are built untrained.

    .venv/bin/python bench/cost_bench.py [--config configs/default.yaml] [--best NAME]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import build_model, get_spec  # noqa: E402
from models.cost import machine, multiply_adds  # noqa: E402
from orchestrator.config import load_config, resolve_members  # noqa: E402


@torch.no_grad()
def images_per_s(nets: list, x: torch.Tensor, seconds: float) -> float:
    for net in nets:
        net(x)  # warm-up
    start, passes = time.perf_counter(), 0
    while passes < 3 or time.perf_counter() - start < seconds:
        for net in nets:
            net(x)
        passes += 1
    return x.shape[0] * passes / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--best", help="the best member's name (default: the config's first member)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    p.add_argument("--classes", type=int, default=None, help="classes of the head (default: the config's)")
    args = p.parse_args()
    members = resolve_members(load_config(args.config))
    classes = args.classes or load_config(args.config).data.classes or 1000
    classes = classes if isinstance(classes, int) else len(classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for m in members:
        size = get_spec(m.arch).eval_transform(m.low_res, m.input_size).crop
        net = build_model(m.arch, num_classes=classes, low_res=m.low_res).to(device).eval()
        rows.append((m.name, net, size, multiply_adds(m.arch, m.low_res, size, classes)))
    best = next(r for r in rows if r[0] == args.best) if args.best else rows[0]
    size = best[2]
    assert all(r[2] == size for r in rows), "members of several input sizes: time them per size"
    x = torch.randn(64, 3, size, size, device=device)
    for name, net, _, macs in rows:
        print(f"{name}: {macs / 1e6:.1f} M multiply-adds, {images_per_s([net], x, args.seconds):.0f} images/s")
    alone = images_per_s([best[1]], x, args.seconds)
    together = images_per_s([r[1] for r in rows], x, args.seconds)
    speed = together / alone
    macs = best[3] / sum(r[3] for r in rows)
    print(f"{machine(device)}, batch 64, {len(rows)} members: ensemble {together:.0f} images/s, best member "
          f"{best[0]} {alone:.0f} images/s: speed ratio {speed:.3f}; multiply-add ratio {macs:.3f}; "
          f"apart by {max(speed, macs) / min(speed, macs):.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
