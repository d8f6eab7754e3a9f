"""The evaluation's recompute path (checkpoints -> shards -> each member's eval transform ->
softmax rows) against the raw inference rate of the same model, batch and device on
synthetic tensors already in memory. Goal: >= 0.9.

    python bench/recompute_bench.py                          # 4 ResNet-18 members at 64 px, the 10,000 Tiny-ImageNet val images
    python bench/recompute_bench.py --members 1              # one member: the split's decoding is all its own
    python bench/recompute_bench.py --arch resnet50 --size 224 --no-low-res

An evaluation recomputes its members one after another, and members that share an eval
geometry share one decoded copy of the split (ensemble/core/decoded.py): the figure is the
members' images per second, decoding included, against the raw rate. The checkpoints are
untrained models written to a temporary folder (the rate does not depend on the
weights), and the evaluation cache points there too and is emptied before each round
(decoded split and predictions), so nothing is reused across rounds. The machine is
shared: each round measures the raw rate before and after its recompute, and the median
of the rounds' ratios is the figure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def raw_rate(model, batch: int, size: int, n: int, device) -> float:
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        model(images)  # warm-up
        start, seen = time.perf_counter(), 0
        while seen < n:
            model(images).float().softmax(1).cpu()
            seen += batch
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                  "tiny-imagenet-200"))
    p.add_argument("--split", default="val")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--low-res", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--members", type=int, default=4, help="members recomputed per round, one after another")
    p.add_argument("--rounds", type=int, default=5, help="raw / recompute / raw rounds; the median ratio is printed")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ENSEMBLE_CACHE"] = folder
        from ensemble.core.predictions import recompute
        from models import build_model, get_spec, save_checkpoint
        from orchestrator.data.dataset import open_split
        from orchestrator.records.runs_file import MemberRecord

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        n = len(open_split(args.data, args.split, args.classes, args.per_class))
        ev = get_spec(args.arch).eval_transform(args.low_res, args.size)
        records = []
        for i in range(args.members):
            torch.manual_seed(i)
            model = build_model(args.arch, num_classes=args.classes, low_res=args.low_res).eval()
            path = os.path.join(folder, f"model{i}.pt")
            save_checkpoint(path, arch=args.arch, num_classes=args.classes, low_res=args.low_res, model=model)
            records.append(MemberRecord(name=f"m{i}", key=f"m-{i}", arch=args.arch, checkpoint=path,
                                        eval=ev.to_dict(), low_res=args.low_res))
        ratios, raws, rates, firsts = [], [], [], []
        for _ in range(args.rounds):  # the VM is shared: a median over rounds, each its own ratio
            for cache in ("recomputed", "decoded"):  # nothing reused across rounds
                shutil.rmtree(os.path.join(folder, cache), ignore_errors=True)
            raw1 = raw_rate(model.to(device), args.batch, ev.crop, n, device)
            start = time.perf_counter()
            for i, record in enumerate(records):
                preds = recompute(record, args.data, args.split, args.classes, args.per_class, batch_size=args.batch)
                assert preds.array.shape == (n, args.classes) and preds.source == "recomputed (none)"
                if i == 0:
                    firsts.append(n / (time.perf_counter() - start))
            recomputed = n * len(records) / (time.perf_counter() - start)
            raw2 = raw_rate(model.to(device), args.batch, ev.crop, n, device)
            raws.append((raw1 + raw2) / 2)
            rates.append(recomputed)
            ratios.append(recomputed / raws[-1])
    print(f"{args.arch} {ev.crop} px, {n} images, {args.members} members, batch {args.batch}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU x {os.cpu_count()}'}")
    for raw, rate, first, ratio in zip(raws, rates, firsts, ratios):
        print(f"raw inference: {raw:,.0f} images/s; recompute path (checkpoint load, decode, transform, softmax): "
              f"{rate:,.0f} images/s per member ({first:,.0f} for the first, which decodes the split: "
              f"{first / raw:.2f}); ratio {ratio:.2f}")
    first_ratios = [f / r for f, r in zip(firsts, raws)]
    print(f"first member alone (decoding the split): median {statistics.median(first_ratios):.2f}")
    print(f"recompute ratio ({args.members} members; recompute / raw inference, median of {len(ratios)} rounds): "
          f"{statistics.median(ratios):.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
