"""Does one network keep the ensemble's gain? The distill step, like for like, over seeds.

The first command's ensemble (four members of VGG-8 and ResNet-20 on 20 Tiny-ImageNet
classes, each on its own quarter of train) is the teacher; `configs/distill.yaml` trains a
ResNet-20 student (one member's size) on all of train but the minival, the images the
members shared among them, with alpha 0.9 and T 4, and its plain twin on the same images,
epochs and seed. Each seed is one such pair; all pairs train in one job
(`distill.student.seed` a list), students first, so the CPU a finished twin frees goes to
the next pair. The figure is reported per seed and pooled over the seeds, on the 1,000
val images (all 50 of each class: the split the teacher was scored on, never trained on or
chosen on).

Why 1,000 rows and 3 seeds: the rows are all the val images the teacher's 20 classes have
(more rows need another teacher); at n = 1,000 a paired difference of two networks has a
95% interval of about +-2.5 points, the size of the ensemble's own gain over its best
member (+3.4), so one pair says little. A network's top-1 moves 1 to 2 points between
seeds; three pairs average that out, and their rows pooled (each row's misses averaged
over the seeds) narrow the interval. A student takes about 15 minutes on one of the 2 CPUs
(it runs the four members at every step), a twin about 7; packed two at a time the three
pairs take about 36 minutes, the teacher about 4 more, within the 45-minute budget.

    .venv/bin/python bench/distill_bench.py                 # trains the first command if runs.yaml is missing
    .venv/bin/python bench/distill_bench.py --members runs.yaml --seeds 3
    .venv/bin/python bench/distill_bench.py --teacher-config configs/distill-teacher.yaml --out distill-full

Prints, per seed and pooled: student, twin and ensemble error, the share of the
ensemble's gain over the twin that the student keeps with its paired 95% bootstrap
interval (rows resampled; pooled, each row's misses averaged over the seeds), and the
student's cost against the ensemble's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ensemble.core import distilled  # noqa: E402
from orchestrator.records.runs_file import load_runs  # noqa: E402


def job(args: list[str], out: Path, env: dict) -> None:
    started = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_ensemble.py"), *args], cwd=out, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(f"  ({' '.join(args)}: {(time.time() - started) / 60:.1f} min)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", help="the teacher's runs file (default: train --teacher-config into --out)")
    p.add_argument("--teacher-config", help="the teacher's config (default: the first command's, members on shares)")
    p.add_argument("--seeds", type=int, default=3, help="student/twin pairs, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--out", default="distill-bench", help="working folder (default: %(default)s)")
    args = p.parse_args()
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(RAY_ADDRESS="local", DATA_ROOT=env.get("DATA_ROOT", str(ROOT.parent / "shared" / "data")),
               ENSEMBLE_STORAGE=str(out / "outputs"))
    members = Path(args.members).resolve() if args.members else out / "runs.yaml"
    if not args.members:
        print(f"the teacher: {args.teacher_config or 'the first command'}'s ensemble", flush=True)
        job([*(["--config", str(Path(args.teacher_config).resolve())] if args.teacher_config else []),
             "--runs", str(members)], out, env)
    seeds = list(range(args.seeds))
    print(f"seeds {seeds}: a student and its plain twin each, side by side", flush=True)
    runs_path = out / f"distill-{args.seeds}seeds.yaml"
    # a re-run of a finished (or interrupted) job trains only what is missing
    job(["--config", str(ROOT / "configs" / "distill.yaml"), "--runs", str(runs_path)], out,
        {**env, "TEACHER_RUNS": str(members), "STUDENT_SEED": str(seeds)})
    rows = distilled.compare(load_runs(str(runs_path)))
    print(f"on {rows[0]['samples']} val images (paired 95% bootstrap over rows; pooled: each row's misses "
          f"averaged over the seeds):")
    for line in distilled.lines(rows):
        print(f"  {line}")
    print(f"(bench: {(time.time() - started) / 60:.1f} min)")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
