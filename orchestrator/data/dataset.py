"""A split as the training loop sees it: subset, decoded, partitioned across workers.

Two modes, one interface:
- *subset* (classes and/or a per-class count given): the selected samples' encoded bytes
  are read once into memory (Tiny-ImageNet whole is ~140 MB), in dataset order;
- *stream* (the whole split): shards are streamed each pass, never held in memory.

Partitioning follows torchvision's reference `DistributedSampler` use: training ranks get
disjoint, equal-length parts (so DDP ranks take the same number of steps); evaluation
ranks get disjoint parts that together hold every sample exactly once, with no padding
(torchvision warns that a padded val set biases the result; we never pad). The
DataLoader datasets over a split are in `orchestrator/data/streams.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from orchestrator.data import minival, minival_store, shares as shares_of
from orchestrator.data.manifest import FOLDER_PREFIX, Manifest, check_shards_exist, load_manifest
from orchestrator.data.sources import Sample, iter_shard, list_folder_split
from orchestrator.data.split_ref import SplitRef
from orchestrator.base.errors import UserError


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 CHW RGB tensor; greyscale and CMYK become 3-channel RGB."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class TooManyBadImages(RuntimeError):
    """More undecodable images in an epoch than data.max_bad_images allows."""


class BadImages:
    """Counts images that fail to decode (corrupt or truncated files), across DataLoader
    worker processes: a shared-memory integer, inherited by the forked workers."""

    def __init__(self):
        import multiprocessing

        self._count = multiprocessing.Value("l", 0)

    def add(self) -> None:
        with self._count.get_lock():
            self._count.value += 1

    @property
    def total(self) -> int:
        return int(self._count.value)


def try_decode(data: bytes, bad: BadImages | None) -> torch.Tensor | None:
    try:
        return decode_rgb(data)
    except RuntimeError:  # torchvision's decoders raise RuntimeError on corrupt data
        if bad is not None:
            bad.add()
        return None


def select_classes(manifest: Manifest, classes: int | list[str] | None) -> list[int]:
    """Original class indices kept, in order: the first N, or the listed wnids."""
    if classes is None:
        return list(range(manifest.num_classes))
    if isinstance(classes, int):
        if not 1 <= classes <= manifest.num_classes:
            raise UserError(f"data.classes is {classes}; {manifest.name} has {manifest.num_classes} classes")
        return list(range(classes))
    by_wnid = {c["wnid"]: c["index"] for c in manifest.classes}
    for wnid in classes:
        if wnid not in by_wnid:
            raise UserError(f"class {wnid!r} is not in {manifest.name} (see its manifest.json for the wnids)")
    return [by_wnid[w] for w in classes]


@dataclass
class Split:
    """One split of a dataset after class/per-class selection; labels are remapped to
    0..K-1 in the order of the kept classes."""

    manifest: Manifest
    split: SplitRef  # which samples (a name given as a string is parsed once, here)
    kept: list[int]
    per_class: int | None
    records: list[Sample] | None  # subset mode: the selected samples, dataset order
    # a streamed part of a split (the rest of train after its minival, a share): the
    # indices of the manifest's split it skips (sorted)
    exclude: np.ndarray | None = None

    def __post_init__(self):
        self.split = SplitRef.parse(self.split)

    @property
    def shard_split(self) -> str:
        """The manifest's split whose shards hold this split's samples."""
        return self.split.base

    @cached_property
    def _excluded(self) -> frozenset:
        return frozenset() if self.exclude is None else frozenset(self.exclude.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.kept)

    @property
    def share(self) -> str | None:
        """Which share of train this is ("2 of 4"; orchestrator/data/shares.py), else None."""
        return self.split.describe_share()

    @property
    def class_names(self) -> list[str]:
        return [self.manifest.classes[i]["wnid"] for i in self.kept]

    def __len__(self) -> int:
        if self.records is not None:
            return len(self.records)
        total = sum(s.samples for s in self.manifest.shards(self.shard_split))
        return total - (0 if self.exclude is None else len(self.exclude))

    def urls(self) -> list[str]:
        return [self.manifest.url(s) for s in self.manifest.shards(self.shard_split)]

    def iter_raw(self, url: str) -> Iterator[Sample]:
        """One shard's samples with original labels; a folder split's without their bytes
        (read with `_read(key)` only for the samples kept)."""
        if url.startswith(FOLDER_PREFIX):
            wnids = [c["wnid"] for c in self.manifest.classes]
            for path, label in list_folder_split(self.manifest.root, url.removeprefix(FOLDER_PREFIX), wnids):
                yield Sample(path, b"", label)
        else:
            n = self.manifest.num_classes
            for s in iter_shard(url, self._sha256.get(url)):
                if not 0 <= s.label < n:
                    raise UserError(f"shard {url}: sample {s.key} has label {s.label}, outside 0..{n - 1} "
                                    f"({self.manifest.name} has {n} classes)")
                yield s

    @cached_property
    def _sha256(self) -> dict[str, str]:
        return {self.manifest.url(s): s.sha256 for s in self.manifest.shards(self.shard_split) if s.sha256}

    @cached_property
    def labels(self) -> list[int]:
        """Labels of an in-memory split, in order (sampling plans each pass from them)."""
        return [s.label for s in self.records]

    def all_labels(self) -> np.ndarray:
        """Every label in dataset order: from memory, from the manifest's labels file
        (a streamed split: no pass over the images), or else from one pass."""
        if self.records is not None:
            return np.asarray(self.labels, dtype=np.int64)
        if self.exclude is not None:
            return np.delete(self.source_labels(), self.exclude)
        labels = self.manifest.split_labels(self.shard_split)
        if labels is not None:
            return labels
        return np.array([s.label for s in self.iter_samples()], dtype=np.int64)

    def source_labels(self) -> np.ndarray:
        """Labels of the whole streamed split this one reads (skipped samples included)."""
        labels = self.manifest.split_labels(self.shard_split)
        if labels is not None:
            return labels
        whole = Split(self.manifest, self.shard_split, self.kept, self.per_class, None)
        return np.array([s.label for s in whole.iter_samples()], dtype=np.int64)

    def iter_indexed(self, me: int, total: int) -> Iterator[tuple[int, Sample]]:
        """Reader slot `me` of `total`'s part of the split as (dataset index, sample); the
        parts are disjoint and cover every sample once. A streamed split is divided by
        shard, so each shard is read by one slot only (a gzip shard cannot be split; with
        fewer shards than slots the spare slots read nothing), and each sample's index
        comes from the manifest's per-shard counts. In memory, or for a folder layout
        (read per file), every total-th sample."""
        if self.exclude is not None:
            raise RuntimeError(f"{self.split} is a training part: it is not evaluated")
        shards = [] if self.records is not None else self.manifest.shards(self.shard_split)
        if self.records is not None or any(s.file.startswith(FOLDER_PREFIX) for s in shards):
            for j, s in enumerate(self.iter_samples(keep=lambda i: i % total == me)):
                yield me + j * total, s
            return
        offsets = self.manifest.offsets(self.shard_split)
        for k in range(me, len(shards), total):
            url, n = self.manifest.url(shards[k]), 0
            for n, s in enumerate(self.iter_raw(url), 1):
                yield offsets[k] + n - 1, Sample(s.key, s.data, s.label)
            if n != shards[k].samples:
                raise UserError(f"shard {url} holds {n} samples; the manifest says {shards[k].samples}")

    def iter_samples(self, urls: list[str] | None = None, keep=None) -> Iterator[Sample]:
        """Samples in dataset order (from memory, or streamed from `urls`); with `keep`,
        only those whose position i in this stream has keep(i) (a folder source then
        reads no other file)."""
        if self.records is not None:
            yield from (s for i, s in enumerate(self.records) if keep is None or keep(i))
            return
        remap = {c: i for i, c in enumerate(self.kept)}
        skip = self._excluded
        start = dict(zip(self.urls(), self.manifest.offsets(self.shard_split))) if skip else {}
        i = 0
        for url in urls if urls is not None else self.urls():
            for n, s in enumerate(self.iter_raw(url)):
                if s.label not in remap or (skip and start[url] + n in skip):
                    continue
                if keep is None or keep(i):
                    data = s.data or _read(s.key)
                    yield Sample(s.key, data, remap[s.label])
                i += 1


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_split(root: str, split: str | SplitRef, classes=None, per_class: int | None = None,
               num_classes: int | None = None) -> Split:
    """A split of the dataset at `root`, or a part of train carved by
    orchestrator/data/minival.py (`SplitRef` with a part; `<train>@minival:m:seed` and
    `<train>@rest:m:seed` by name)."""
    ref = SplitRef.parse(split)
    if ref.part is not None:
        rest, chosen = carve_minival(open_split(root, ref.base, classes, per_class, num_classes), ref.minival,
                                     ref.seed)
        return chosen if ref.part == "minival" else rest
    manifest = load_manifest(root)
    if num_classes is not None and num_classes != manifest.num_classes:
        raise UserError(f"data.num_classes is {num_classes} but {root}/manifest.json lists {manifest.num_classes}")
    split = ref.base
    check_shards_exist(manifest, split)
    kept = select_classes(manifest, classes)
    split_obj = Split(manifest, split, kept, per_class, None)
    if classes is not None or per_class is not None:
        split_obj.records = _read_subset(split_obj)
    return split_obj


def carve_minival(whole: Split, per_class: int, seed: int) -> tuple[Split, Split]:
    """(the rest of train, its minival) from one read of the train split, each named as
    `open_split` opens it again (orchestrator/data/minival.py)."""
    held_name, rest_name = whole.split.carved(per_class, seed)
    if whole.records is None:  # streamed: carve by the labels; the minival's samples, read once
        rest, chosen = minival.carve(whole.all_labels(), whole.num_classes, per_class, seed)
        wanted = frozenset(chosen)  # per machine, are kept by minival_store
        key = minival_store.key_of(whole.manifest.root, whole.shard_split, per_class, seed, whole.kept,
                                   whole.manifest.shards(whole.shard_split))
        held = minival_store.load_or_carve(key, lambda: whole.iter_samples(keep=wanted.__contains__))
        return (Split(whole.manifest, rest_name, whole.kept, whole.per_class, None,
                      exclude=np.asarray(chosen, dtype=np.int64)),
                Split(whole.manifest, held_name, whole.kept, whole.per_class, held))
    rest, chosen = minival.carve(whole.labels, whole.num_classes, per_class, seed)
    return (Split(whole.manifest, rest_name, whole.kept, whole.per_class, [whole.records[i] for i in rest]),
            Split(whole.manifest, held_name, whole.kept, whole.per_class, [whole.records[i] for i in chosen]))


def take_share(split: Split, shares: int, share: int) -> Split:
    """Share `share` of `shares` of a training split (orchestrator/data/shares.py): in
    memory, its samples; streamed, the same split with every other sample skipped."""
    name = split.split.share_of(share, shares)
    if split.records is not None:
        keep = shares_of.positions(split.labels, shares, share)
        return Split(split.manifest, name, split.kept, split.per_class, [split.records[i] for i in keep])
    source = split.source_labels()
    candidates = np.setdiff1d(np.arange(len(source)), [] if split.exclude is None else split.exclude)
    keep = candidates[shares_of.positions(source[candidates], shares, share)]
    return Split(split.manifest, name, split.kept, split.per_class, None,
                 exclude=np.setdiff1d(np.arange(len(source)), keep))


def _read_subset(split: Split) -> list[Sample]:
    """The first `per_class` samples of each kept class, in shard order; stops reading as
    soon as every class is full, so small subsets of big datasets are cheap."""
    remap = {c: i for i, c in enumerate(split.kept)}
    counts = [0] * len(split.kept)
    cap = split.per_class or float("inf")
    out: list[Sample] = []
    for url in split.urls():
        for s in split.iter_raw(url):
            i = remap.get(s.label)
            if i is None or counts[i] >= cap:
                continue
            counts[i] += 1
            out.append(Sample(s.key, s.data or _read(s.key), i))
        if split.per_class and all(c >= cap for c in counts):
            break
    empty = [split.class_names[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise UserError(f"{split.split} split has no samples of class {empty[0]} ({len(empty)} classes empty)")
    return out
