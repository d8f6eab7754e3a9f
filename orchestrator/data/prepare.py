"""Turn an ILSVRC/ImageFolder layout into WebDataset shards plus `manifest.json`.

    python -m orchestrator.data.prepare /data/ILSVRC2012 s3://bucket/imagenet \
        --splits train val --shard-samples 5000

Input: `train/<wnid>/*.JPEG`; val as `val/<wnid>/*` or a flat `val/` with a labels file
(`val_annotations.txt`, `labels.txt`: `<file> <wnid or index>`). Output: gzip tar shards
`<split>-NNNN.tar.gz` (members `<key>.jpg` + `<key>.cls`, the layout of
../shared/data/README.md) and a manifest with class list, per-split counts and per-shard
sha256, written locally or to any fsspec URL. Each split's labels in dataset order are
also written once as `<split>-labels.npy` (int32, named in the manifest): evaluation and
label-shuffled sampling get every label from it without a pass over the images. Train samples are shuffled once (seed 0)
so that a stream mixes classes; other splits keep their sorted order. JPEG bytes are
copied unchanged: no re-encoding.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import tarfile
from collections import Counter

import fsspec
import numpy as np
from rich.progress import track

from orchestrator.base.storage import join
from orchestrator.data.sources import list_folder_classes, list_folder_split
from orchestrator.base.errors import UserError, exit_on_user_error


def _write_shard(url: str, items: list[tuple[str, bytes, int]]) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for key, data, label in items:
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    blob = buf.getvalue()
    with fsspec.open(url, "wb") as f:
        f.write(blob)
    return {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "samples": len(items),
            "first_key": items[0][0], "last_key": items[-1][0]}


def write_labels(dst: str, split: str, labels) -> dict:
    """A split's labels in dataset order as one int32 .npy file (5 MB for ImageNet's
    1.28M): the manifest's `labels` entry."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(labels, dtype=np.int32))
    blob, file = buf.getvalue(), f"{split}-labels.npy"
    with fsspec.open(join(dst, file), "wb") as f:
        f.write(blob)
    return {"file": file, "sha256": hashlib.sha256(blob).hexdigest()}


def write_split(dst: str, split: str, samples, total: int, shard_samples: int, shuffled: bool,
                progress: bool = True) -> dict:
    """Write `samples` (an iterable of (key, encoded bytes, label), `total` of them) as
    shards of `shard_samples` plus the labels file; returns the manifest's split entry."""
    shards, labels, items = [], [], []

    def flush():
        file = f"{split}-{len(shards):04d}.tar.gz"
        shards.append({"file": file, **_write_shard(join(dst, file), items)})
        items.clear()

    for key, data, label in (track(samples, total=total, description=f"{split} samples") if progress else samples):
        items.append((key, data, label))
        labels.append(label)
        if len(items) == shard_samples:
            flush()
    if items:
        flush()
    counts = Counter(labels)
    return {"samples": len(labels), "shuffled": shuffled, "per_class_min": min(counts.values()),
            "per_class_max": max(counts.values()), "labels": write_labels(dst, split, labels), "shards": shards}


def write_manifest(dst: str, name: str, wnids: list[str], splits: dict, **extra) -> dict:
    manifest = {"name": name, "format": "webdataset-tar, gzip-compressed", "num_classes": len(wnids),
                "classes": [{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)], "splits": splits,
                **extra}
    with fsspec.open(join(dst, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def prepare(src: str, dst: str, splits: list[str], shard_samples: int, name: str | None = None) -> dict:
    wnids = list_folder_classes(src)
    entries = {}
    for split in splits:
        pairs = list_folder_split(src, split, wnids)
        if not pairs:
            raise UserError(f"{src}/{split} holds no images")
        if split == "train":
            random.Random(0).shuffle(pairs)
        samples = ((f"{split}_{i}", _read(path), label) for i, (path, label) in enumerate(pairs))
        entries[split] = write_split(dst, split, samples, len(pairs), shard_samples, shuffled=split == "train")
    return write_manifest(dst, name or src.rstrip("/").rsplit("/", 1)[-1], wnids, entries, shuffle_seed=0)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@exit_on_user_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pack a folder layout into shards + manifest.json")
    p.add_argument("src", help="folder with train/<wnid>/ (and val/)")
    p.add_argument("dst", help="output folder or URL (s3://bucket/prefix)")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--shard-samples", type=int, default=5000, help="samples per shard (default: %(default)s)")
    p.add_argument("--name", help="dataset name (default: the source folder's name)")
    args = p.parse_args(argv)
    if args.shard_samples < 1:
        raise UserError("--shard-samples must be at least 1")
    m = prepare(args.src, args.dst, args.splits, args.shard_samples, args.name)
    print(f"wrote {args.dst}: {m['num_classes']} classes, " +
          ", ".join(f"{s} {v['samples']} samples in {len(v['shards'])} shards" for s, v in m["splits"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
