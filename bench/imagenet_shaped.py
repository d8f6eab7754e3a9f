"""An ImageNet-shaped data set for drills: ILSVRC-2012's structure with tiny images.

    python bench/imagenet_shaped.py /tmp/imagenet-shaped              # 1,281,167 + 50,000
    python bench/imagenet_shaped.py /tmp/imagenet-shaped --scale 0.01  # same structure, 1%

1,000 classes whose train counts follow ILSVRC-2012's spread (732 to 1,300 images, most
classes at the 1,300 cap, 1,281,167 in all) and 50 val images per class, written as
standard shards plus manifest through the platform's own writer
(`orchestrator.data.prepare.write_split`): val in at least 64 shards, so that every
(rank, loader) slot of 8 ranks x 4 loaders has whole shards to read.

Per-class counts (`class_counts`, seeded): the cap of 1,300 for all classes but
`BELOW_CAP` = 66 of them (the classes ILSVRC-2012 has below the cap, so that the average
deficit, about 285, matches its 18,833 images), those drawn uniformly in [732, 1,299],
one set to exactly 732 (ILSVRC's smallest), and the remainder to the exact total spread
one image at a time over the below-cap classes. `--scale s` multiplies every count
(at least one image per class), keeping the shape.

Images: 32-48 px JPEGs of a few hundred bytes whose colour and stripe pattern depend on
the class (a model can learn them), drawn from a pool of `VARIANTS` encoded images per
class (shifted and noised), so the whole set is a few hundred MB and builds in minutes.
Test data only: nothing here is a real image.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.data.prepare import write_manifest, write_split  # noqa: E402

CLASSES = 1000
TRAIN_TOTAL = 1_281_167
CAP, FLOOR = 1300, 732
BELOW_CAP = 66
VAL_PER_CLASS = 50
VARIANTS = 24
MIN_VAL_SHARDS = 64


def class_counts(seed: int = 0) -> np.ndarray:
    """ILSVRC-2012-shaped train counts per class, summing to exactly 1,281,167."""
    rng = np.random.default_rng(seed)
    counts = np.full(CLASSES, CAP, dtype=np.int64)
    below = rng.choice(CLASSES, BELOW_CAP, replace=False)
    counts[below] = rng.integers(FLOOR, CAP, size=BELOW_CAP)
    counts[below[0]] = FLOOR
    step, order = np.sign(TRAIN_TOTAL - counts.sum()), below[1:]
    i = 0
    while counts.sum() != TRAIN_TOTAL:  # spread the remainder over the below-cap classes
        c = order[i % len(order)]
        if FLOOR < counts[c] + step < CAP:
            counts[c] += step
        i += 1
    return counts


def scaled(counts: np.ndarray, scale: float) -> np.ndarray:
    return np.maximum(1, np.round(counts * scale)).astype(np.int64)


def _pool(label: int, rng: np.random.Generator) -> list[bytes]:
    """VARIANTS small JPEGs of class `label`: its own hue and stripe frequency/angle."""
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], dtype=np.float32)
    freq, angle = 1 + label % 7, (label % 11) * math.pi / 11
    out = []
    for _ in range(VARIANTS):
        size = int(rng.integers(32, 49))
        y, x = np.mgrid[0:size, 0:size] / size
        shift = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) + shift)[..., None]
        img = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=60)
        out.append(buf.getvalue())
    return out


def _samples(split: str, labels: np.ndarray, pools: list[list[bytes]], seed: int):
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, VARIANTS, size=len(labels))
    for i, (label, v) in enumerate(zip(labels.tolist(), pick.tolist())):
        yield f"{split}_{i}", pools[label][v], label


def generate(dst: str, scale: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """Write the data set to `dst` (a folder or URL); returns its manifest."""
    rng = np.random.default_rng(seed + 1)
    pools = [_pool(c, rng) for c in range(CLASSES)]
    train = np.repeat(np.arange(CLASSES), scaled(class_counts(seed), scale))
    rng.shuffle(train)  # a train stream mixes classes, as prepare's train shards do
    val = np.repeat(np.arange(CLASSES), max(1, round(VAL_PER_CLASS * scale)))  # source order, as ILSVRC val
    splits = {}
    for name, labels, shards in (("train", train, 256), ("val", val, MIN_VAL_SHARDS)):
        per_shard = max(1, len(labels) // shards)  # at least `shards` shards
        splits[name] = write_split(dst, name, _samples(name, labels, pools, seed + len(name)), len(labels),
                                   per_shard, shuffled=name == "train", progress=progress)
    wnids = [f"n{c:08d}" for c in range(CLASSES)]
    return write_manifest(dst, "imagenet-shaped", wnids, splits, scale=scale, seed=seed,
                          generator="bench/imagenet_shaped.py")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder or URL")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of every class's count (default 1: full size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0 < args.scale <= 1:
        raise SystemExit(f"error: --scale must be in (0, 1], got {args.scale}")
    start = time.time()
    m = generate(args.out, args.scale, args.seed)
    size = sum(s["bytes"] for v in m["splits"].values() for s in v["shards"])
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v['samples']:,} samples in {len(v['shards'])} shards"
                                          for k, v in m["splits"].items())
          + f", {size / 1e6:.0f} MB, in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
