"""The splits as DataLoader datasets: `TrainStream` (endless passes for one training
rank, plain or label-shuffled, in memory or streamed by shard) and `EvalStream` (one
pass of a rank's disjoint part, every sample scored exactly once). Each DataLoader
process reads its own slot of the rank's part (`_slots`).
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from orchestrator.data.dataset import BadImages, Split, _read, try_decode
from orchestrator.data.sampling import epoch_length, epoch_order, pass_seed, rank_part, streamed_copies
from orchestrator.data.sources import Sample


def _slots() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def decoded_or_grey(data: bytes, bad: BadImages) -> torch.Tensor:
    """The image, or (undecodable: counted in `bad`) a blank grey one, so that a one-pass
    reader still yields a row for every sample."""
    img = try_decode(data, bad)
    return torch.full((3, 64, 64), 128, dtype=torch.uint8) if img is None else img


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
        seed = pass_seed(self.seed, p)
        if self.split.records is not None:
            mine = rank_part(epoch_order(self.split.labels, seed, self.label_shuffling), self.rank, self.world)
            for i in mine[slot::nslots]:
                yield self.split.records[i]
            return
        rng = random.Random(seed)
        urls = self.split.urls()
        rng.shuffle(urls)
        total = self.world * nslots
        me = self.rank * nslots + slot
        if self.label_shuffling:
            stream = self._streamed_shuffled(urls, rng, seed, slot, nslots)
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
            yield index, self.transform(decoded_or_grey(s.data, self.bad)), s.label


class KeyedStream(IterableDataset):
    """Every sample of a split once, as (key, image, label), for one-pass jobs over a
    training split (a teacher's CAM build): a streamed split's shards are divided among
    the loader workers (shard k to worker k mod workers, each shard read once), an
    in-memory one by position. Arrival order differs from dataset order; the key says
    which sample each row is. An undecodable image comes as a grey one (counted in `bad`);
    training skips it anyway."""

    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform
        self.bad = BadImages()

    def __iter__(self):
        slot, nslots = _slots()
        if self.split.records is not None:
            samples = self.split.iter_samples(keep=lambda i: i % nslots == slot)
        else:
            samples = self.split.iter_samples(urls=self.split.urls()[slot::nslots])
        for s in samples:
            yield s.key, self.transform(decoded_or_grey(s.data, self.bad)), s.label
