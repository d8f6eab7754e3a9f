"""The evaluation split decoded once, for every member that recomputes its predictions.

Recomputing 20 members' predictions would otherwise read, decode and resize the same
split 20 times: on 2 CPU cores that input work is about a tenth of a ResNet-18's
inference time at 64 px, and on a GPU a ResNet-50's inference outruns a handful of JPEG
decoding threads several times over (docs/performance.md). So the split is decoded once
per eval geometry (resize, centre crop) into a local uint8 [N, 3, crop, crop] .npy file,
and each member then streams its batches from that file in dataset order; per-member
normalisation (mean/std) stays on the batch, where it costs next to nothing.

The file lives in the evaluation cache beside the recomputed predictions, keyed by the
dataset's manifest, the selection and the geometry; it is written under a temporary name
and renamed when complete, so an interrupted run never leaves a partial file in use.
A split whose decoded size would exceed `ENSEMBLE_DECODED_MAX_GB` (default 20) or the
cache disk's free space less 1 GB is not cached, nor is one whose writing fails: members
then decode it while they run (`stream_batches`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ensemble.core.stored import NpyRows
from orchestrator.data.streams import EvalStream
from orchestrator.data.dataset import load_manifest, open_split, select_classes
from orchestrator.data.manifest import FOLDER_PREFIX
from orchestrator.data.sources import list_folder_split
from orchestrator.data.split_ref import SplitRef


def max_bytes() -> float:
    return float(os.environ.get("ENSEMBLE_DECODED_MAX_GB", "20")) * 1e9


def _dataset_digest(manifest, split: str) -> str:
    """The split's identity, so a dataset rebuilt at the same path is decoded afresh: its
    classes and shards (names, sample counts, sizes, checksums), and for a folder layout
    read in place its files' names, labels, sizes and modification times."""
    split = SplitRef.parse(split).base  # a part of train is identified by train's files (and its name)
    shards = manifest.shards(split)
    digest = hashlib.sha256(json.dumps([manifest.classes, [dataclasses.astuple(s) for s in shards]]).encode())
    if shards and shards[0].file.startswith(FOLDER_PREFIX):
        for path, label in list_folder_split(manifest.root, split, [c["wnid"] for c in manifest.classes]):
            st = os.stat(path)
            digest.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_path(cache: Path, manifest, split: str, classes, per_class, resize: int, crop: int) -> Path:
    key = f"{manifest.root}|{_dataset_digest(manifest, split)}|{split}|{classes}|{per_class}|{resize}|{crop}"
    return cache / "decoded" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}-{crop}px.npy"


def _unchanged(img: torch.Tensor) -> torch.Tensor:
    return img


def collate_eval(geometry, samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, uint8 image, label) samples -> a batch, resized and cropped at once when it can."""
    idx, images, labels = zip(*samples)
    return torch.tensor(idx), geometry.batch(list(images)), torch.tensor(labels)


def stream_batches(data, geometry, batch_size: int, workers: int):
    """(dataset indices, uint8 [B, 3, crop, crop]) batches decoded from the shards."""
    loader = torch.utils.data.DataLoader(EvalStream(data, _unchanged), batch_size=batch_size,
                                         num_workers=workers,
                                         collate_fn=functools.partial(collate_eval, geometry))
    return ((idx, images) for idx, images, _labels in loader)


def decode_split(target: Path, data, geometry, batch_size: int = 256) -> Path:
    """Decode the whole split into `target` with every core (nothing else runs meanwhile)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.partial.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(data), 3, geometry.crop, geometry.crop))
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task(f"decoding {data.split} at {geometry.crop} px (once, for every member)",
                                total=len(data))
            for idx, images in stream_batches(data, geometry, batch_size, min(4, os.cpu_count() or 1)):
                out[idx.numpy()] = images.numpy()
                bar.advance(task, len(idx))
        out.flush()
        del out
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class DecodedSplit:
    """A split's decoded images, read back in dataset order one batch at a time."""

    def __init__(self, path: Path, num_classes: int, crop: int):
        self.rows, self.num_classes = NpyRows(str(path)), num_classes
        if self.rows.ndim != 4 or self.rows.shape[1:] != (3, crop, crop):
            raise RuntimeError(f"decoded split {path} has shape {self.rows.shape}; delete it to decode again")

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int):
        for lo in range(0, len(self), batch_size):
            hi = min(lo + batch_size, len(self))
            yield torch.arange(lo, hi), torch.from_numpy(self.rows[lo:hi])


def open_decoded(cache: Path, data_root: str, split: str, classes, per_class, geometry) -> DecodedSplit | None:
    """The split decoded at `geometry`, decoding it on first use; None when it is too large
    to cache (the caller then streams it). Once decoded, no shard is read again."""
    manifest = load_manifest(data_root)  # read once: the key and the class count both come from it
    num_classes = len(select_classes(manifest, classes))
    path = cache_path(cache, manifest, split, classes, per_class, geometry.resize, geometry.crop)
    if not path.exists():
        data = open_split(data_root, split, classes, per_class)
        size = len(data) * 3 * geometry.crop ** 2
        if size > max_bytes() or size > _free_bytes(path.parent) - (1 << 30):
            return None
        try:
            decode_split(path, data, geometry)
        except OSError as exc:  # the disk filled meanwhile: nothing is kept, the members decode as they go
            print(f"warning: could not cache the decoded split in {path.parent} ({exc}); decoding per member",
                  file=sys.stderr)
            return None
    return DecodedSplit(path, num_classes, geometry.crop)


def _free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free
