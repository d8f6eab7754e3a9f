"""Input pipeline against synthetic data: one member's training rate fed by the real
pipeline (shards -> decode -> augment -> batch) over its rate on the same model, batch
size and device fed with synthetic tensors already in memory. Goal: >= 0.9.

    python bench/input_bench.py                       # CPU: ResNet-18 at 64 px on Tiny-ImageNet
    python bench/input_bench.py --arch resnet50 --size 224 --no-low-res --batch 256 \\
        --data bench/.data/imagenet-sample-1k-160 --split val --upscale 375 --decode gpu   # a GPU

Both runs use the training core's own step (`loop.train_epoch`: bf16 autocast and
channels_last on CUDA), after warm-up steps; the synthetic rate is measured before and
after the real one and averaged, so drift on a shared machine cancels. `--upscale S`
re-encodes the images with short side S (ImageNet's are about 500x375; the 1k sample's
are 160 px), so decode costs what it costs on the full data set. Needs only torch,
torchvision and fsspec (no Ray, no MLflow), so it runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import build_model, get_spec  # noqa: E402
from orchestrator.data.dataset import decode_rgb, open_split  # noqa: E402
from orchestrator.data.streams import TrainStream  # noqa: E402
from orchestrator.data.sources import Sample  # noqa: E402
from orchestrator.train import augment, batch_augment, loop  # noqa: E402
from orchestrator.train.pass_batches import loader_batches  # noqa: E402
from orchestrator.train.prefetch import Prefetcher  # noqa: E402


def upscale(split, short_side: int) -> None:
    """Re-encode the in-memory images with `short_side` px (quality 90)."""
    from torchvision.io import encode_jpeg
    from torchvision.transforms.v2 import functional as F

    split.records = [Sample(s.key, encode_jpeg(F.resize(decode_rgb(s.data), short_side, antialias=True),
                                               quality=90).numpy().tobytes(), s.label) for s in split.records]


def real_batches(split, fields, args, device):
    spec = get_spec(args.arch).eval_transform(args.low_res, args.size)
    workers = args.workers
    if args.decode == "gpu":  # the member's own path: whole-pass batches from the loader processes
        raw = loader_batches(TrainStream(split, None, 0, 1, seed=0, batch_size=args.batch), workers, device)
        aug = batch_augment.PassAugment(batch_augment.BatchAugment(fields, args.size, spec.mean, spec.std, device))
        return Prefetcher(iter(raw), aug.apply, device)
    tf = augment.build_train_transform(fields, args.size, spec.mean, spec.std)
    return iter(loader_batches(TrainStream(split, tf, 0, 1, seed=0, batch_size=args.batch), workers, device))


def rate(model, optimizer, batches, args, device) -> float:
    """Images/s over `args.steps` steps, after `args.warmup` steps."""
    cuda = device.type == "cuda"
    criterion = torch.nn.CrossEntropyLoss()
    state = loop.FitState()
    loop.train_epoch(model, optimizer, batches, args.warmup, lambda s: 0.01, state, device, criterion,
                     channels_last=cuda)
    return loop.train_epoch(model, optimizer, batches, args.steps, lambda s: 0.01, state, device, criterion,
                            channels_last=cuda)["images_per_s"]


def decode_rates(split, device, n: int = 256) -> str:
    """JPEG decode images/s: one CPU thread, and batched on the device when it is a GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in split.records[:n]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    for d in data:
        decode_jpeg(d, mode=ImageReadMode.RGB)
    cpu = len(data) / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    out = f"JPEG decode: {cpu:,.0f} images/s on one CPU thread"
    if device.type == "cuda":
        decode_jpeg(data[:8], mode=ImageReadMode.RGB, device=device)  # nvJPEG initialisation
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        torch.cuda.synchronize()
        out += f", {4 * len(data) / (time.perf_counter() - t):,.0f} images/s batched with nvJPEG"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                  "tiny-imagenet-200"))
    p.add_argument("--split", default="train")
    p.add_argument("--classes", type=int, default=None, help="first N classes (default: all)")
    p.add_argument("--per-class", type=int, default=None, help="images per class held in memory")
    p.add_argument("--upscale", type=int, default=None, help="re-encode images with this short side (px)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--low-res", action=argparse.BooleanOptionalAction, default=False,
                   help="the 32-64 px stem (4x the compute of the ImageNet stem at 64 px)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--preset", default="light", help="augmentation preset")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: per image in loader processes; gpu: per batch on the device")
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    per_class = args.per_class or (None if args.classes else 10)
    split = open_split(args.data, args.split, args.classes, per_class)
    if args.upscale:
        upscale(split, args.upscale)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU x {os.cpu_count()}'}, "
          f"{args.arch} {args.size} px batch {args.batch}, {len(split)} images in memory, decode {args.decode}, "
          f"{args.workers} loader workers", flush=True)
    print(decode_rates(split, device), flush=True)
    model = build_model(args.arch, num_classes=split.num_classes, low_res=args.low_res).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fields = augment.resolve(args.preset, {})
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, split.num_classes, (args.batch,), device=device)
    synthetic = itertools.repeat((images, labels))
    s1 = rate(model, optimizer, synthetic, args, device)
    print(f"synthetic: {s1:,.0f} images/s", flush=True)
    real = rate(model, optimizer, real_batches(split, fields, args, device), args, device)
    print(f"real pipeline: {real:,.0f} images/s", flush=True)
    s2 = rate(model, optimizer, synthetic, args, device)
    print(f"synthetic again: {s2:,.0f} images/s", flush=True)
    synth = (s1 + s2) / 2
    print(f"input pipeline ratio (real / synthetic, decode {args.decode}): {real:,.0f} / {synth:,.0f} = "
          f"{real / synth:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
