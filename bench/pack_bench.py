"""Packing: K small members trained as K separate processes sharing one device, their
total images/s over one trainer's. This is how small members share a GPU here: separate
single-worker trials with fractional GPUs (two DDP ranks on one GPU fail in NCCL).

    python bench/pack_bench.py                                   # CPU: K = 1, 2
    python bench/pack_bench.py --k 1 2 4 8 --batch 256 --out packing.json   # a GPU

Each trainer runs the training core's step (`loop.train_epoch`) on synthetic batches
(CIFAR-size low-res ResNet-18 by default, the BACKGROUND.md reference), starts timing at
a shared barrier and stops after `--seconds`; it reports images/s and its peak GPU
memory. `--out` writes {"gains": {K: total/one}, "memory_gb": peak per trainer}, the
figures `orchestrator.planning.packing` decides from (a cluster file's `packing:` and a member's
`resources.gpu_memory_gb`). The last line is the best gain.

`--plain` also runs, for each K, the same network trained by a plain PyTorch loop (no
platform code: torchvision's ResNet-18 with the 3x3 stem, SGD, bf16 autocast and
channels_last on a GPU, one synchronisation per timed window), the reference the
platform's packed members are held to: each K's line gains `platform / plain`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 10  # steps between clock reads (the platform's loop synchronises once per call too)


def plain_trainer(rank: int, args, barrier, results, threads: int) -> None:
    """The reference: a training loop as a plain script writes it."""
    import torchvision
    from torch import nn

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet18(num_classes=args.classes)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last) if cuda else images
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    barrier.wait()
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(CHUNK):
            step()
        seen += CHUNK * args.batch
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    results.put((seen / seconds, torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0))


def trainer(rank: int, args, barrier, results, threads: int) -> None:
    from models import build_model
    from orchestrator.train import loop

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = build_model(args.arch, num_classes=args.classes, low_res=True).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    batches = iter(lambda: (images, labels), None)
    state, criterion = loop.FitState(), torch.nn.CrossEntropyLoss()

    def steps(n):
        return loop.train_epoch(model, optimizer, batches, n, lambda s: 0.01, state, device, criterion,
                                channels_last=cuda)

    steps(args.warmup)
    barrier.wait()
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        steps(CHUNK)
        seen += CHUNK * args.batch
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0
    results.put((seen / seconds, memory))


# Trainers are forked from one server process that has imported torch and the platform
# once (no CUDA in it), not spawned: a spawned process re-imports everything, seconds each.
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(["__main__", "torch", "torchvision", "models", "orchestrator.train.loop"])


def run(k: int, args, target=trainer) -> tuple[float, float]:
    barrier, queue = CONTEXT.Barrier(k), CONTEXT.Queue()
    threads = max(1, (os.cpu_count() or 1) // k) if not torch.cuda.is_available() else 2
    procs = [CONTEXT.Process(target=target, args=(r, args, barrier, queue, threads)) for r in range(k)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = []
    while not queue.empty():
        results.append(queue.get())
    if len(results) != k:
        raise SystemExit(f"{k - len(results)} of {k} trainers failed (out of memory?)")
    return sum(r for r, _ in results), max(m for _, m in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], help="trainer counts to measure (first = baseline)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", help="write the gains and memory as JSON here")
    p.add_argument("--plain", action="store_true", help="also time a plain PyTorch loop at each K (resnet18 only)")
    args = p.parse_args()
    if args.plain and args.arch != "resnet18":
        print(f"error: --plain times torchvision's resnet18 only; got --arch {args.arch}", file=sys.stderr)
        raise SystemExit(2)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x {os.cpu_count()}"
    print(f"device {device}: {args.arch} (low-res) {args.size} px, batch {args.batch}, {args.seconds:g} s per K",
          flush=True)
    base, gains, memory, vs_plain = None, {}, 0.0, {}
    for k in args.k:
        total, mem = run(k, args)
        base = base or total / args.k[0] * 1  # the first K is the baseline (normally 1)
        gains[k] = total / base
        memory = max(memory, mem)
        plain = ""
        if args.plain:
            reference, _ = run(k, args, plain_trainer)
            vs_plain[k] = total / reference
            plain = f"; plain PyTorch {reference:,.0f} images/s in total, platform / plain {vs_plain[k]:.2f}"
        print(f"K={k}: {total:,.0f} images/s in total, {total / k:,.0f} per trainer, gain {gains[k]:.2f}x"
              + (f", peak {mem:.2f} GB per trainer" if mem else "") + plain, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "arch": args.arch, "size": args.size, "batch": args.batch,
                       "gains": gains, "memory_gb": memory, "platform_over_plain": vs_plain}, f, indent=1)
    best = max(gains, key=gains.get)
    print(f"packing gain: {best} trainers on one device give {gains[best]:.2f}x the images/s of {args.k[0]}")


if __name__ == "__main__":
    main()
