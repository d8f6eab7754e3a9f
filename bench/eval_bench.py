"""Time and peak memory of `ensemble.evaluate` on ImageNet-sized cached predictions.

    python bench/eval_bench.py                      # 20 members x 50,000 x 1,000 (float32)
    python bench/eval_bench.py --dtype both         # float32 and float16 in one run: the storage cost
    python bench/eval_bench.py --members 5 --samples 10000

Writes synthetic member predictions (softmax of logits with a per-member signal on the
true class, so errors are realistic) and a runs.yaml to a temporary folder, then runs the
evaluation in a child process and reports its wall time and peak RSS. The last line is
the figure: seconds and GB, and their ratios to the goals (10 s, 2 GB).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml


def write_members(folder: str, members: int, samples: int, classes: int, dtype=torch.float32, seed: int = 0) -> str:
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
        np.save(path, logits.softmax(1).to(dtype).numpy())
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
    p.add_argument("--dtype", choices=["float32", "float16", "both"], default="float32",
                   help="storage of the predictions (float32: what the platform writes)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra evaluate arguments")
    args = p.parse_args()
    results = {}
    for name in (["float32", "float16"] if args.dtype == "both" else [args.dtype]):
        results[name] = run_one(args, name)
    if len(results) == 2:
        (s32, m32), (s16, m16) = results["float32"], results["float16"]
        print(f"float32 over float16 storage: {s32 / s16:.2f}x the time, {m32 / m16:.2f}x the peak memory")


def run_one(args, dtype_name: str) -> tuple[float, float]:
    dtype = getattr(torch, dtype_name)
    size = torch.finfo(dtype).bits // 8
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        runs = write_members(folder, args.members, args.samples, args.classes, dtype)
        print(f"wrote {args.members} x {args.samples} x {args.classes} {dtype_name} predictions "
              f"({args.members * args.samples * args.classes * size / 1e9:.1f} GB) in {time.perf_counter() - t:.0f} s")
        cmd = [sys.executable, "-m", "ensemble.evaluate", "--members", runs, "--out", os.path.join(folder, "report"),
               "--no-mlflow", *args.extra]
        t = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest so far
        seconds = time.perf_counter() - t
        if status != 0:
            raise SystemExit(child.stderr.read().decode())
        peak_gb = usage.ru_maxrss / 1e6  # KiB -> GB
    print(f"evaluate ({dtype_name}): {seconds:.1f} s ({seconds / 10:.2f} x the 10 s goal), peak RSS {peak_gb:.2f} GB "
          f"({peak_gb / 2:.2f} x the 2 GB goal)")
    return seconds, peak_gb


if __name__ == "__main__":
    main()
