"""Time and peak memory of `ensemble.evaluate` on ImageNet-sized cached predictions.

    python bench/eval_bench.py                      # 20 members x 50,000 x 1,000 (float16)
    python bench/eval_bench.py --members 5 --samples 10000

Writes synthetic member predictions (softmax of logits with a per-member signal on the
true class, so errors are realistic) and a runs.yaml to a temporary folder, then runs the
evaluation in a child process and reports its wall time and peak RSS. The last line is
the figure: seconds and GB, and their ratios to the goals (10 s, 2 GB).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml


def write_members(folder: str, members: int, samples: int, classes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    np.save(os.path.join(folder, "labels.npy"), labels)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i in range(members):
        logits = torch.randn(samples, classes, generator=gen) * 2.0
        strength = 3.0 + 2.0 * torch.rand(samples, generator=gen)  # member-specific, sample-varying signal
        logits[torch.arange(samples), torch.from_numpy(labels)] += strength
        path = os.path.join(folder, f"m{i}.npy")
        np.save(path, logits.softmax(1).to(torch.float16).numpy())
        records.append({"name": f"m{i}", "key": f"m{i}-0", "arch": "resnet50", "predictions": path,
                        "eval": {"input_size": 224, "resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225]}})
    runs = {"version": 1, "ensemble": "bench", "members": records,
            "dataset": {"name": "synthetic", "uri": folder, "split": "val", "num_classes": classes,
                        "samples": samples, "labels": os.path.join(folder, "labels.npy")}}
    path = os.path.join(folder, "runs.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(runs, f)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra evaluate arguments")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        runs = write_members(folder, args.members, args.samples, args.classes)
        print(f"wrote {args.members} x {args.samples} x {args.classes} float16 predictions "
              f"({args.members * args.samples * args.classes * 2 / 1e9:.1f} GB) in {time.perf_counter() - t:.0f} s")
        cmd = [sys.executable, "-m", "ensemble.evaluate", "--members", runs, "--out", os.path.join(folder, "report"),
               "--no-mlflow", *args.extra]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB
        print(out.stdout.strip().splitlines()[-3])
    print(f"evaluate: {seconds:.1f} s ({seconds / 10:.2f} x the 10 s goal), peak RSS {peak_gb:.2f} GB "
          f"({peak_gb / 2:.2f} x the 2 GB goal)")


if __name__ == "__main__":
    main()
