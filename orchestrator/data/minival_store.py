"""A streamed train split's minival, carved once per machine and kept.

Carving a minival from a streamed split (`dataset.carve_minival`) picks its samples by the
labels file, but their bytes lie in every shard: at ImageNet size a 1.28M-image pass. So
the first member process on a machine reads them once and writes them here; every later
member, data-parallel rank, restart and job with the same key reads this one file (the
minival's own bytes, nothing else).

- Where: `$ENSEMBLE_DATA_CACHE/minival/<key>.bin` (default ~/.cache/ensemble-data): the
  samples' bytes end to end, and `<key>.json`, their keys, labels and lengths (written
  last: a key with no index is not there). No per-sample headers: a start reads the
  minival's own bytes and an index of about 50 bytes a sample.
- Key: the data root, the split, the minival's size and seed, the kept classes, and the
  split's shards as the manifest lists them (files, counts, checksums): a changed manifest
  is a new key, so the minival is carved again.
- Written under a temporary name and renamed, holding a file lock, so members that start
  together on one machine carve it once and no reader sees half a file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
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
    index = cache_root() / "minival" / f"{key}.json"
    if index.exists():
        return read(index)
    index.parent.mkdir(parents=True, exist_ok=True)
    with _locked(index.with_suffix(".lock")):
        if not index.exists():  # another process may have carved it while this one waited
            _write(index, carve())
    return read(index)


def read(index: Path) -> list[Sample]:
    entries = json.loads(index.read_text())
    blob, at, out = index.with_suffix(".bin").read_bytes(), 0, []
    for key, label, size in entries:
        out.append(Sample(key, blob[at:at + size], label))
        at += size
    return out


def _write(index: Path, samples: Iterator[Sample]) -> None:
    entries, blob = [], index.with_suffix(".bin")
    tmp = blob.with_name(f"{blob.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for s in samples:
            f.write(s.data)
            entries.append((s.key, s.label, len(s.data)))
    os.replace(tmp, blob)
    tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, index)


@contextmanager
def _locked(lock: Path):
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
