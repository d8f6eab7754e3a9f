"""A split as the training loop sees it: subset, decoded, partitioned across workers.

Two modes, one interface:
- *subset* (classes and/or a per-class count given): the selected samples' encoded bytes
  are read once into memory (Tiny-ImageNet whole is ~140 MB), in dataset order;
- *stream* (the whole split): shards are streamed each pass, never held in memory.

Partitioning follows torchvision's reference `DistributedSampler` use: training ranks get
disjoint, equal-length parts (so DDP ranks take the same number of steps); evaluation
ranks get disjoint parts that together hold every sample exactly once, with no padding
(torchvision warns that a padded val set biases the result; we never pad).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from orchestrator.data import minival
from orchestrator.data.manifest import FOLDER_PREFIX, Manifest, check_shards_exist, load_manifest
from orchestrator.data.sampling import epoch_length, epoch_order, rank_part, streamed_copies
from orchestrator.data.sources import Sample, iter_shard, list_folder_split
from orchestrator.errors import UserError


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
    split: str
    kept: list[int]
    per_class: int | None
    records: list[Sample] | None  # subset mode: the selected samples, dataset order
    # a streamed part of a split (the rest of train after its minival): the manifest's split
    # it streams, and the indices of that split it skips (sorted)
    source: str | None = None
    exclude: np.ndarray | None = None

    @property
    def shard_split(self) -> str:
        return self.source or self.split

    @cached_property
    def _excluded(self) -> frozenset:
        return frozenset() if self.exclude is None else frozenset(self.exclude.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.kept)

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
        labels = self.manifest.split_labels(self.split)
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
        shards = [] if self.records is not None else self.manifest.shards(self.split)
        if self.records is not None or any(s.file.startswith(FOLDER_PREFIX) for s in shards):
            for j, s in enumerate(self.iter_samples(keep=lambda i: i % total == me)):
                yield me + j * total, s
            return
        offsets = self.manifest.offsets(self.split)
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


def open_split(root: str, split: str, classes=None, per_class: int | None = None,
               num_classes: int | None = None) -> Split:
    """A split of the dataset at `root`; `<train>@minival:m:seed` and `<train>@rest:m:seed`
    name the two parts of train carved by orchestrator/data/minival.py."""
    base, part, held, seed = minival.parse(split)
    if part is not None:
        rest, chosen = carve_minival(open_split(root, base, classes, per_class, num_classes), held, seed)
        return chosen if part == "minival" else rest
    manifest = load_manifest(root)
    if num_classes is not None and num_classes != manifest.num_classes:
        raise UserError(f"data.num_classes is {num_classes} but {root}/manifest.json lists {manifest.num_classes}")
    check_shards_exist(manifest, split)
    kept = select_classes(manifest, classes)
    split_obj = Split(manifest, split, kept, per_class, None)
    if classes is not None or per_class is not None:
        split_obj.records = _read_subset(split_obj)
    return split_obj


def carve_minival(whole: Split, per_class: int, seed: int) -> tuple[Split, Split]:
    """(the rest of train, its minival) from one read of the train split, each named as
    `open_split` opens it again (orchestrator/data/minival.py)."""
    held_name, rest_name = minival.split_names(whole.split, per_class, seed)
    if whole.records is None:  # streamed: carve by the labels, hold only the minival's samples
        rest, chosen = minival.carve(whole.all_labels(), whole.num_classes, per_class, seed)
        wanted = frozenset(chosen)
        held = [s for i, s in enumerate(whole.iter_samples()) if i in wanted]
        return (Split(whole.manifest, rest_name, whole.kept, whole.per_class, None, source=whole.split,
                      exclude=np.asarray(chosen, dtype=np.int64)),
                Split(whole.manifest, held_name, whole.kept, whole.per_class, held))
    rest, chosen = minival.carve(whole.labels, whole.num_classes, per_class, seed)
    return (Split(whole.manifest, rest_name, whole.kept, whole.per_class, [whole.records[i] for i in rest]),
            Split(whole.manifest, held_name, whole.kept, whole.per_class, [whole.records[i] for i in chosen]))


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


def _slots() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(IterableDataset):
    """Endless training stream for one rank: pass after pass, reshuffled per pass
    (seed + pass), each pass this rank's disjoint part. The loop takes a fixed number of
    steps per epoch, so every DDP rank steps equally even when shard sizes differ.

    `label_shuffling` balances classes per pass: in memory from the labels; streamed, from
    the manifest's labels file, each sample yielded as many times as `streamed_copies`
    draws it while this rank reads its own shards. From pass `plain_from_pass` on, `plain_transform` replaces
    `transform` (strong augmentation off for the last epochs). A transform with
    `keyed = True` is called with the sample's key too (CAM-guided crops look up its map).
    With `transform=None` nothing is decoded here: samples come out as (encoded bytes as a
    uint8 tensor, label, pass), for a pipeline that decodes whole batches on the GPU.
    """

    def __init__(self, split: Split, transform, rank: int, world: int, seed: int, start_pass: int = 0,
                 shuffle_buffer: int = 2000, label_shuffling: bool = False, plain_transform=None,
                 plain_from_pass: int | None = None):
        self.split, self.transform, self.rank, self.world = split, transform, rank, world
        self.seed, self.start_pass, self.shuffle_buffer = seed, start_pass, shuffle_buffer
        self.label_shuffling = label_shuffling
        self.plain_transform, self.plain_from_pass = plain_transform, plain_from_pass
        self.bad = BadImages()

    def samples_per_pass(self) -> int:
        if self.split.records is None and not self.label_shuffling:
            return len(self.split)
        return epoch_length(self._labels(), self.label_shuffling)

    def _labels(self) -> np.ndarray:
        """The split's labels, read once per process (int64 per sample, no image bytes)."""
        if getattr(self, "_labels_cache", None) is None:
            self._labels_cache = self.split.all_labels()
        return self._labels_cache

    def _streamed_shuffled(self, urls: list[str], rng, p_seed: int, slot: int, nslots: int) -> Iterator[Sample]:
        """A label-shuffled pass of a streamed split: this rank's shards, each sample as
        many times as it is drawn (sampling.streamed_copies)."""
        if self.split.exclude is None:
            labels = self._labels()
        else:  # the rest of train: indices of the whole split, its minival never drawn
            if getattr(self, "_source_cache", None) is None:
                self._source_cache = self.split.source_labels()
            labels = self._source_cache
        shards = self.split.manifest.shards(self.split.shard_split)
        start = dict(zip((self.split.manifest.url(s) for s in shards), self.split.manifest.offsets(self.split.shard_split)))
        size = {self.split.manifest.url(s): s.samples for s in shards}
        owner = np.empty(len(labels), dtype=np.int64)
        by_shard = len(urls) >= self.world
        held = [0] * self.world
        mine = []
        for url in urls:  # in this pass's shuffled order, each shard to the rank holding fewest samples
            r = held.index(min(held))  # (even totals: no rank holds more samples than its share of draws)
            held[r] += size[url]
            owner[start[url]:start[url] + size[url]] = r
            if r == self.rank:
                mine.append(url)
        if not by_shard:  # fewer shards than ranks: every rank reads all, keeps every world-th sample
            owner, mine = np.arange(len(labels)) % self.world, urls
        copies = streamed_copies(labels, owner, self.world, p_seed, skip=self.split.exclude)
        for url in mine[slot::nslots] if by_shard else mine:
            for n, s in enumerate(self.split.iter_raw(url)):
                i = start[url] + n
                if owner[i] == self.rank and (by_shard or i % nslots == slot) and copies[i]:
                    data = s.data or _read(s.key)  # a folder layout is read per file
                    for _ in range(copies[i]):
                        yield Sample(s.key, data, s.label)

    def _one_pass(self, p: int, slot: int, nslots: int) -> Iterator[Sample]:
        pass_seed = self.seed * 1_000_003 + p
        if self.split.records is not None:
            mine = rank_part(epoch_order(self.split.labels, pass_seed, self.label_shuffling), self.rank, self.world)
            for i in mine[slot::nslots]:
                yield self.split.records[i]
            return
        rng = random.Random(pass_seed)
        urls = self.split.urls()
        rng.shuffle(urls)
        total = self.world * nslots
        me = self.rank * nslots + slot
        if self.label_shuffling:
            stream = self._streamed_shuffled(urls, rng, pass_seed, slot, nslots)
        elif len(urls) >= total:  # shard-level split: each shard read by one slot only
            stream = self.split.iter_samples(urls[me::total])
        else:  # fewer shards than readers: sample-level split
            stream = self.split.iter_samples(urls, keep=lambda i: i % total == me)
        buffer: list[Sample] = []
        for s in stream:
            buffer.append(s)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def transform_for(self, p: int):
        plain = self.plain_transform is not None and self.plain_from_pass is not None and p >= self.plain_from_pass
        return self.plain_transform if plain else self.transform

    def __iter__(self):
        slot, nslots = _slots()
        p = self.start_pass
        while True:
            if self.transform is None:
                for s in self._one_pass(p, slot, nslots):
                    yield torch.frombuffer(bytearray(s.data), dtype=torch.uint8), s.label, p
                p += 1
                continue
            tf = self.transform_for(p)
            keyed = getattr(tf, "keyed", False)
            for s in self._one_pass(p, slot, nslots):
                img = try_decode(s.data, self.bad)
                if img is None:
                    continue  # skipped and counted; the loop fails the run past data.max_bad_images
                yield (tf(img, s.key) if keyed else tf(img)), s.label
            p += 1


class EvalStream(IterableDataset):
    """One pass over a rank's part of a split, yielding (dataset index, image, label).
    Parts are disjoint across ranks and loader workers and cover every sample once; a
    streamed split's shards are each read by one (rank, loader) slot (`Split.iter_indexed`)."""

    def __init__(self, split: Split, transform, rank: int = 0, world: int = 1):
        self.split, self.transform, self.rank, self.world = split, transform, rank, world
        self.bad = BadImages()

    def __iter__(self):
        slot, nslots = _slots()
        for index, s in self.split.iter_indexed(self.rank * nslots + slot, self.world * nslots):
            img = try_decode(s.data, self.bad)
            if img is None:
                # still scored (as a blank grey image), so every index keeps its row; counted
                img = torch.full((3, 64, 64), 128, dtype=torch.uint8)
            yield index, self.transform(img), s.label
