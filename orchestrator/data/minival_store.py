"""A streamed train split's minival, carved once per machine and kept.

Carving a minival from a streamed split (`dataset.carve_minival`) picks its samples by the
labels file, but their bytes lie in every shard: at ImageNet size a 1.28M-image pass. So
the first member process on a machine reads them once and writes them here; every later
member, data-parallel rank, restart and job with the same key reads this one file (the
minival's own bytes, nothing else).

- Where: `$ENSEMBLE_DATA_CACHE/minival/<key>.tar` (default ~/.cache/ensemble-data), one
  uncompressed tar per key: each sample's bytes, then `index.json` (keys and labels).
- Key: the data root, the split, the minival's size and seed, the kept classes, and the
  split's shards as the manifest lists them (files, counts, checksums): a changed manifest
  is a new key, so the minival is carved again.
- Written under a temporary name and renamed, holding a file lock, so members that start
  together on one machine carve it once and no reader sees half a file.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.data.sources import Sample


def cache_root() -> Path:
    return Path(os.environ.get("ENSEMBLE_DATA_CACHE", Path.home() / ".cache" / "ensemble-data"))


def key_of(root: str, split: str, per_class: int, seed: int, kept: list[int], shards: list) -> str:
    listed = [(s.file, s.samples, s.sha256) for s in shards]
    text = json.dumps([root, split, per_class, seed, kept, listed])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_or_carve(key: str, carve: Callable[[], Iterator[Sample]]) -> list[Sample]:
    """The stored minival for `key`; else `carve()` (one pass over the split) is stored
    first. Samples in dataset order."""
    path = cache_root() / "minival" / f"{key}.tar"
    if path.exists():
        return read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if not path.exists():  # another process may have carved it while this one waited
            _write(path, carve())
    return read(path)


def read(path: Path) -> list[Sample]:
    with tarfile.open(path) as tar:
        index = json.loads(tar.extractfile("index.json").read())
        return [Sample(key, tar.extractfile(f"{i:08d}").read(), label) for i, (key, label) in enumerate(index)]


def _write(path: Path, samples: Iterator[Sample]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    index = []
    with tarfile.open(tmp, "w") as tar:
        for i, s in enumerate(samples):
            _add(tar, f"{i:08d}", s.data)
            index.append((s.key, s.label))
        _add(tar, "index.json", json.dumps(index).encode())
    os.replace(tmp, path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@contextmanager
def _locked(lock: Path):
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
