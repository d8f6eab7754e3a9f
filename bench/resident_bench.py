"""The resident data mode against synthetic tensors already on the device.

    python bench/resident_bench.py                  # this machine's CPU (or the GPU there is)
    python bench/resident_bench.py --arch resnet18 --size 64 --batch 256 --device cuda

Trains the same model with the same optimiser for `--steps` steps per round, fed either
by `ResidentBatches` (a Tiny-ImageNet subset decoded once on the device, each batch
gathered by index, cropped, flipped and normalised there: `data.resident`) or by one
random batch that is already on the device (no data work at all). Rounds alternate
between the two (the machine is shared and noisy); the figure is the ratio of the
medians of their step rates (goal: at least 0.95).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import build_model  # noqa: E402
from orchestrator.data import resident  # noqa: E402
from orchestrator.data.dataset import open_split  # noqa: E402
from orchestrator.train import augment, batch_augment  # noqa: E402
from orchestrator.train.resident_batches import ResidentBatches  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rate(model, opt, batches, steps: int, device) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tiny-imagenet-200"))
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    split = open_split(args.data, "train", classes=args.classes, per_class=args.per_class)
    held = resident.load(split, device)
    fields = augment.resolve("light", {})
    aug = batch_augment.BatchAugment(fields, args.size, MEAN, STD, device)
    real = iter(ResidentBatches(held, split, aug, batch_size=args.batch, seed=0,
                                max_steps=len(held) // args.batch))  # full batches only
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    synthetic = iter(lambda: (x, y), None)
    model = build_model(args.arch, num_classes=args.classes, low_res=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rate(model, opt, synthetic, 3, device)  # warm-up
    got = {"resident": [], "synthetic": []}
    for _ in range(args.rounds):
        got["resident"].append(rate(model, opt, real, args.steps, device))
        got["synthetic"].append(rate(model, opt, synthetic, args.steps, device))
    med = {k: statistics.median(v) * args.batch for k, v in got.items()}
    print(f"{args.arch} {args.size} px, batch {args.batch}, {device.type} ({torch.get_num_threads()} threads): "
          f"resident {med['resident']:.0f} images/s, synthetic on the device {med['synthetic']:.0f} images/s "
          f"(medians of {args.rounds} alternating rounds of {args.steps} steps)")
    print(f"resident / synthetic: {med['resident'] / med['synthetic']:.2f}")


if __name__ == "__main__":
    main()
