"""torch.compile as a member option (`recipe.compile: true`): its compile time and the
training rate it buys, eager against compiled, on the same model, batch and device.

    python bench/compile_bench.py                                         # CPU: small and quick
    python bench/compile_bench.py --arch resnet50 --size 224 --no-low-res --batch 256   # a GPU

Both use the training core's step (`loop.train_epoch`); the compile time is the first
compiled step's wall time minus a steady step's, the figure a member logs as `compile_s`.
The last line is the speed-up ratio and the compile time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model  # noqa: E402
from orchestrator.train import loop  # noqa: E402


def measure(model, args, device, steps: int) -> dict:
    cuda = device.type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    batches = iter(lambda: (images, labels), None)
    state, criterion = loop.FitState(), torch.nn.CrossEntropyLoss()
    first = loop.train_epoch(model, optimizer, batches, 3, lambda s: 0.01, state, device, criterion,
                             channels_last=cuda)
    steady = loop.train_epoch(model, optimizer, batches, steps, lambda s: 0.01, state, device, criterion,
                              channels_last=cuda)
    return {"first_step_s": first["first_step_s"], "step_s": steady["step_s"],
            "images_per_s": steady["images_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--low-res", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x {os.cpu_count()}"
    print(f"device {name}: {args.arch} {args.size} px batch {args.batch}", flush=True)

    def fresh():
        torch.manual_seed(0)
        m = build_model(args.arch, num_classes=100, low_res=args.low_res).to(device)
        return m.to(memory_format=torch.channels_last) if device.type == "cuda" else m

    eager = measure(fresh(), args, device, args.steps)
    print(f"eager: {eager['images_per_s']:,.0f} images/s", flush=True)
    compiled = measure(torch.compile(fresh()), args, device, args.steps)
    compile_s = compiled["first_step_s"] - compiled["step_s"]
    print(f"compiled: {compiled['images_per_s']:,.0f} images/s", flush=True)
    print(f"torch.compile: {compiled['images_per_s'] / eager['images_per_s']:.2f}x the eager rate, "
          f"compile time {compile_s:.0f} s")


if __name__ == "__main__":
    main()
