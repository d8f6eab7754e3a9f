"""The batch pipeline on the GPU gives the images the CPU pipeline gives: with a
whole-image crop and no flip both are deterministic, so the only differences are nvJPEG
against libjpeg-turbo decoding and float rounding. Prints the mean absolute difference in
normalised units (a pixel level is about 0.017) and fails above 0.05.

    python bench/gpu_parity.py --data bench/.data/imagenet-sample-1k-160
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.data.dataset import decode_rgb, open_split  # noqa: E402
from orchestrator.train import augment, batch_augment  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_parity needs a CUDA device")
    split = open_split(args.data, args.split, args.n, 1)
    raw = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in split.records]
    labels = torch.tensor([s.label for s in split.records])
    fields = augment.resolve("none", {})
    gpu, gpu_labels = batch_augment.BatchAugment(fields, 224, MEAN, STD, torch.device("cuda"))(raw, labels)
    per_image = augment.build_train_transform(fields, 224, MEAN, STD)
    cpu = torch.stack([per_image(decode_rgb(s.data)) for s in split.records])
    diff = (gpu.cpu() - cpu).abs().mean().item()
    ok = diff < 0.05 and torch.equal(gpu_labels.cpu(), labels)
    print(f"{len(raw)} images: mean |GPU - CPU| = {diff:.4f} (normalised units): {'ok' if ok else 'MISMATCH'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
