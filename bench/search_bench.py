"""Search versus the default recipe at equal compute, and ensemble-aware choice versus top-k.

    python bench/search_bench.py                        # 10 classes x 40 train / 20 val, vgg11_bn 32 px
    python bench/search_bench.py --classes 50 --samples 12 --epochs 8

1. Runs an ASHA search (jobs/search.py's driver, local Ray) over LR policy, peak LR and
   augmentation fields; its compute is the epochs its trials trained in total.
2. Trains members of the default recipe (the search's base) with seeds 0..K-1, K chosen so
   they train the same number of epochs (equal compute), with the same training core.
3. On the held-out half of the val split: the best single model of each, and ensembles of
   the same size chosen by top-k own error, by greedy marginal gain (from the search's
   trials), and the default members.
The last line is the figure: greedy-choice ensemble error / default ensemble error.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from ensemble.core.protocol import split_rows  # noqa: E402
from ensemble.core.math import bootstrap_ci, combine, topk_correct, topk_error  # noqa: E402


def config(args, folder: str) -> dict:
    return {
        "name": "bench-search",
        "data": {"root": str(Path(args.data_root) / "tiny-imagenet-200"), "classes": args.classes,
                 "train_per_class": args.train_per_class, "val_per_class": args.val_per_class},
        "storage": {"path": os.path.join(folder, "out")},
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench-search"},
        "recipes": {"default": {"epochs": args.epochs, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1},
                                "schedule": {"policy": "cosine"}, "augment": {"preset": "standard"}}},
        "defaults": {"input_size": 32, "resources": {"workers": 1, "cpus_per_worker": 1.0, "loader_workers": 0}},
        "members": [{"name": "base", "arch": args.arch, "recipe": "default"}],
        "search": {"num_samples": args.trials, "scheduler": "asha", "asha": {"grace_period": 2, "reduction_factor": 2},
                   "space": {"recipe.schedule.policy": {"choice": ["cosine", "poly", "onecycle", "step"]},
                             "recipe.optimizer.lr": {"loguniform": [0.02, 0.8]},
                             "recipe.schedule.warmup_epochs": {"choice": [0, 1]},
                             "recipe.augment.overrides.crop_scale": {"choice": [[0.08, 1.0], [0.35, 1.0], [0.6, 1.0]]},
                             "recipe.augment.overrides.color_jitter": {"uniform": [0.0, 0.4]},
                             "recipe.augment.overrides.label_smoothing": {"choice": [0.0, 0.1]}},
                   "select": {"size": args.size}},
    }


def default_members(cfg, k: int) -> list[np.ndarray]:
    from orchestrator.config import parse_config, resolve_members
    from orchestrator.train.member import assemble_predictions, open_member_data, predict, train_member

    parsed = parse_config({**cfg, "search": None})
    base = resolve_members(parsed)[0]
    data = open_member_data(parsed.data)
    out = []
    for seed in range(k):
        member = base.model_copy(update={"seed": seed})
        model, _ = train_member(member, data, device=torch.device("cpu"))
        out.append(assemble_predictions([predict(model, data.val, member, torch.device("cpu"))], len(data.val)))
        print(f"default member seed {seed}: top-1 err {topk_error(out[-1], _labels(data), 1):.3f}", flush=True)
    return out


def _labels(data) -> np.ndarray:
    from orchestrator.train.member import split_labels

    return split_labels(data.val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("DATA_ROOT", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--arch", default="vgg11_bn")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--size", type=int, default=3, help="ensemble size for every choice")
    args = p.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "local")
    torch.set_num_threads(1)

    from orchestrator.drivers import search_job as job

    with tempfile.TemporaryDirectory() as folder:
        raw = config(args, folder)
        path = os.path.join(folder, "search.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        cfg, bases = job.load_and_check(path)
        out = job.run(cfg, bases, path, os.path.join(folder, "runs.yaml"))
        rows = out["rows"]
        complete = [r for r in rows if r.get("predictions")]
        compute = sum(r["epochs"] for r in rows)
        k = max(args.size, round(compute / args.epochs))
        print(f"search: {len(rows)} trials, {compute} epochs in total -> {k} default members "
              f"({k * args.epochs} epochs)", flush=True)
        from orchestrator.base import storage

        preds = [storage.read_npy(r["predictions"]) for r in complete]
        labels = storage.read_npy(complete[0]["labels"])
        defaults = default_members(raw, k)

    _, rows_ = split_rows(len(labels), 0.5, 0)  # the same held-out half as the search's choice
    choice = out["choice"]
    lab = labels[rows_]

    def misses(probs) -> np.ndarray:
        return (~topk_correct(probs, lab, 1)).numpy().astype(float)

    best_search = min((misses(p[rows_]) for p in preds), key=np.mean)
    best_default = min((misses(p[rows_]) for p in defaults), key=np.mean)
    default_ens = combine([p[rows_] for p in defaults[: args.size]])
    cols = {
        "best single model": (best_search, best_default),
        f"ensemble of {args.size}: top-k own error": (misses(combine([preds[i][rows_] for i in choice["topk"]["chosen"]])), None),
        f"ensemble of {args.size}: greedy marginal gain": (misses(combine([preds[i][rows_] for i in choice["greedy"]["chosen"]])), None),
        f"ensemble of {args.size}: default seeds": (None, misses(default_ens)),
        f"ensemble of all {k} default members": (None, misses(combine([p[rows_] for p in defaults]))),
    }

    def cell(m):  # error [95% bootstrap interval] (ensemble.core.math.bootstrap_ci)
        if m is None:
            return ""
        lo, hi = bootstrap_ci(m[:, None])[0]
        return f"{m.mean():.3f} [{lo:.2f}, {hi:.2f}]"

    table = [(name, cell(s), cell(d)) for name, (s, d) in cols.items()]
    print(f"\nTiny-ImageNet subset: {args.classes} classes, {args.train_per_class}/class train, n = {len(lab)} "
          f"held-out val images; {args.arch} at 32 px, {args.epochs} epochs; search seeds = Tune's random "
          f"samples, default seeds 0..{k - 1}")
    print(f"{'top-1 error [95% interval]':48s} {'search':>20s} {'default':>20s}")
    for name, s, d in table:
        print(f"{name:48s} {s:>20s} {d:>20s}")
    ratio = choice["greedy"]["top1_err"] / topk_error(default_ens, lab, 1)
    print(f"greedy-choice ensemble / default-recipe ensemble top-1 error at equal compute: {ratio:.3f}")


if __name__ == "__main__":
    main()
