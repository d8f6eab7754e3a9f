"""Orchestration overhead: the wall time of `jobs/train_ensemble.py` for a 20-member
ensemble on a Tiny-ImageNet subset, on its embedded defaults (a local Ray instance, a
local MLflow store and artifact folder), against the members' own training time at the
same concurrency. Goal: overhead under 5%.

    python bench/overhead_bench.py                        # 20 members of ~90 s, 2 at a time: ~16 min here
    python bench/overhead_bench.py --epochs 2             # 20 members of ~30 s: ~6 min
    python bench/overhead_bench.py --members 4 --epochs 1  # a quick look

The overhead is a fixed cost per job (about 20 s here: imports, Ray and the MLflow store
starting, the first trial processes importing torch) plus about 1 to 2 s per member (its
MLflow run, the final checkpoint, artifacts and plots), so its share falls as members
get longer; real members train for hours.

Members' own time is what each member's worker reports as `member_s` (opening its data,
building its model, its epochs of training and validation, its val predictions; read
back from runs.yaml); divided by the concurrency it is the wall time a perfect
orchestrator would need. Everything else is overhead: the driver's imports, Ray start-up,
the MLflow store, starting the trial processes (once per concurrent slot: single-worker
members train in their trial process, which Tune reuses for the next member), checkpoints
written to storage, MLflow runs, artifacts and plots, runs.yaml. Run with nothing else on
the machine and no Ray instance running (the job would join it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(folder: str, args) -> str:
    data = os.path.abspath(args.data)
    cfg = {"name": "overhead", "data": {"root": data, "classes": args.classes, "train_per_class": args.per_class,
                                        "val_per_class": 10},
           "storage": {"path": os.path.join(folder, "outputs")},
           "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "overhead"},
           "ray": {"max_concurrent_members": args.concurrency},
           "recipes": {"r": {"epochs": args.epochs, "batch_size": 32, "schedule": {"policy": "cosine"},
                             "augment": {"preset": "light"}}},
           "defaults": {"arch": "resnet18", "recipe": "r", "input_size": 32,
                        "resources": {"workers": 1, "cpus_per_worker": 0.75, "loader_workers": 0}},
           "grid": {"archs": ["resnet18"], "recipes": ["r"], "seeds": list(range(args.members))}}
    path = os.path.join(folder, "overhead.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tiny-imagenet-200"))
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=40, help="training images per class")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with tempfile.TemporaryDirectory() as folder:
        config = write_config(folder, args)
        runs = os.path.join(folder, "runs.yaml")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train_ensemble.py"), "--config", config,
                              "--runs", runs], cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
        with open(runs) as f:
            members = yaml.safe_load(f)["members"]
    own = sum(m["metrics"]["member_s"] for m in members)
    ideal = own / args.concurrency
    overhead = (wall - ideal) / wall
    print(f"{len(members)} members, {args.concurrency} at a time: job wall time {wall:.0f} s; members' own "
          f"training {own:.0f} s in total, {ideal:.0f} s at this concurrency")
    print(f"per member: {own / len(members):.1f} s of its own work, "
          f"{(wall - ideal) * args.concurrency / len(members):.1f} s of orchestration")
    print(f"orchestration overhead (wall - own / concurrency) / wall: {overhead:.1%} (goal < 5%)")


if __name__ == "__main__":
    main()
