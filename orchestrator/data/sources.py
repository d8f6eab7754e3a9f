"""Sample sources: WebDataset-style shards and the ILSVRC/ImageFolder layout.

Both yield `Sample(key, jpeg_bytes, label)` in a fixed dataset order, so a split can be
subset, partitioned across workers and scored in order. Shards are streamed over fsspec,
which reads local paths, s3:// and any other fsspec URL without temporary copies, through
gzip and `tar_stream` (a tar reader several times faster than tarfile's stream mode here).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

import fsspec

from orchestrator.data.tar_stream import TarError, iter_files
from orchestrator.base.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


@dataclass(frozen=True)
class Sample:
    key: str
    data: bytes  # encoded image
    label: int


class _Hashing:
    """A read-only file wrapper that hashes what is read (verifying a streamed shard
    against the manifest's sha256 costs no second read)."""

    def __init__(self, raw):
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.digest.update(chunk)
        return chunk

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def iter_shard(url: str, sha256: str | None = None) -> Iterator[Sample]:
    """Samples of one shard: `<key>.jpg` + `<key>.cls` members, adjacent in the tar. With
    `sha256`, the bytes read are checked against it when the shard ends."""
    key, data, label = None, None, None
    try:
        with fsspec.open(url, "rb") as raw:
            reader = _Hashing(raw)
            stream = gzip.GzipFile(fileobj=reader, mode="rb") if url.endswith((".gz", ".tgz")) else reader
            for name, payload in iter_files(stream):
                stem, _, ext = name.rpartition(".")
                if stem != key:
                    if key is not None and data is not None and label is not None:
                        yield Sample(key, data, label)
                    key, data, label = stem, None, None
                if ext in ("jpg", "jpeg", "png", "webp"):
                    data = payload
                elif ext == "cls":
                    label = _label(payload, url, stem)
            if sha256 and reader.drain() != sha256:
                raise UserError(f"shard {url}: sha256 differs from the manifest's: the shard is corrupt or was "
                                "replaced (re-run prepare, or fix manifest.json)")
    except FileNotFoundError:
        raise UserError(f"shard not found: {url}") from None
    except (TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"shard {url} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    if key is not None and data is not None and label is not None:
        yield Sample(key, data, label)


def _label(payload: bytes, url: str, key: str) -> int:
    try:
        return int(payload.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"shard {url}: sample {key} has a label that is not an integer: {payload[:20]!r}") from None


def list_folder_classes(root: str) -> list[str]:
    """ILSVRC order: class index = position of the wnid in the sorted train/ folder names."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise UserError(f"{root!r} has neither manifest.json nor a train/<wnid>/ folder layout")
    return sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))


def _images(folder: str) -> list[str]:
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs if f.endswith(IMAGE_EXTS))


def _val_labels_file(root: str) -> dict[str, str]:
    """val labels as `<file> <wnid or index>` lines: ILSVRC's LOC_val_solution-style lists,
    Tiny-ImageNet's val_annotations.txt (tab-separated, wnid second)."""
    for name in ("val_annotations.txt", "labels.txt", "val_labels.txt"):
        for path in (os.path.join(root, "val", name), os.path.join(root, name)):
            if os.path.exists(path):
                with open(path) as f:
                    return {p[0]: p[1] for p in (line.replace("\t", " ").split() for line in f) if len(p) >= 2}
    return {}


def list_folder_split(root: str, split: str, wnids: list[str]) -> list[tuple[str, int]]:
    """(path, label) pairs of a split: `<split>/<wnid>/*.JPEG`, or a flat val folder plus
    a labels file. Sorted, so the order is the dataset order."""
    index = {w: i for i, w in enumerate(wnids)}
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"{root!r} has no {split}/ folder")
    subdirs = [d for d in sorted(os.listdir(folder)) if d in index]
    if subdirs:
        return [(p, index[d]) for d in subdirs for p in _images(os.path.join(folder, d))]
    labels = _val_labels_file(root)
    if not labels:
        raise UserError(f"{folder} has no <wnid>/ subfolders and no labels file (val_annotations.txt or labels.txt)")
    out = []
    for p in _images(folder):
        tag = labels.get(os.path.basename(p))
        if tag is None:
            raise UserError(f"{p} has no entry in the val labels file")
        out.append((p, int(tag) if tag.isdigit() else index[tag]))
    return out


def iter_folder(root: str, split: str, wnids: list[str]) -> Iterator[Sample]:
    for path, label in list_folder_split(root, split, wnids):
        with open(path, "rb") as f:
            yield Sample(os.path.relpath(path, root), f.read(), label)
