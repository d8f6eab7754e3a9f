"""Batch decode with bounded memory: one huge JPEG must not size the batch.

    python bench/decode_memory.py                       # the GPU there is, else the CPU
    python bench/decode_memory.py --batch 256 --size 224

Runs the batch pipeline (`orchestrator.train.batch_augment.BatchAugment`: decode, random
crops, flips, normalisation; nvJPEG on a GPU) over a batch of `--batch` ImageNet-sized
JPEGs (500 x 375), then over the same batch with one 4000 x 3000 JPEG in place of the
first, each in a fresh process, and prints each one's peak memory (the GPU's peak
allocation; on a CPU the process's peak RSS) and their ratio. Padding every image to the
largest one, a batch of 256 at 4000 x 3000 would allocate about 27 GB; the pipeline
decodes oversized images at reduced size and crops in groups of similar size, so the
ratio should stay near 1.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.train import augment, batch_augment  # noqa: E402


def jpeg(h: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)
    img = Image.fromarray(small.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def one_case(batch: int, size: int, huge: bool, device: torch.device) -> dict:
    images = [jpeg(375, 500, k) for k in range(batch)]
    if huge:
        images[0] = jpeg(3000, 4000, 0)
    aug = batch_augment.BatchAugment(augment.resolve("standard", {}), size, (0.485, 0.456, 0.406),
                                     (0.229, 0.224, 0.225), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x, _ = aug(images, torch.arange(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "shape": list(x.shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", choices=["plain", "huge"], help=argparse.SUPPRESS)  # one case, in a child process
    args = p.parse_args()
    device = torch.device(args.device)
    if args.case:
        print(json.dumps(one_case(args.batch, args.size, args.case == "huge", device)))
        return
    got = {}
    for case in ("plain", "huge"):
        out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--size", str(args.size),
                              "--device", args.device, "--case", case], capture_output=True, text=True, check=True)
        got[case] = json.loads(out.stdout.strip().splitlines()[-1])
    what = "GPU peak allocation" if device.type == "cuda" else "peak RSS"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: batch of {args.batch} JPEGs (500 x 375) to {args.size} px: {what} {got['plain']['peak_mib']:.0f} MiB; "
          f"with one 4000 x 3000 JPEG in it: {got['huge']['peak_mib']:.0f} MiB")
    print(f"huge / plain peak memory: {got['huge']['peak_mib'] / got['plain']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
