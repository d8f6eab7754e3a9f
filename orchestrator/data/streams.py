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
from orchestrator.data.passes import PassPlan, plan_pass
from orchestrator.data.sampling import pass_draws, pass_seed, steps_per_pass
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
    """Endless training samples for one rank: pass after pass, each pass this rank's part
    of the pass planned by `passes.plan_pass` (seed + pass: its own draws, shard order and
    shuffle), plain or label-shuffled, in memory or streamed by shard. A streamed rank
    reads only its own shards, each sample yielded as many times as the plan draws it,
    through a shuffle buffer. With `batch_size`, `steps` is the steps of a pass (every
    rank the same); `max_steps` caps it, each rank then keeping the first draws of its part.

    From pass `plain_from_pass` on, `plain_transform` replaces `transform` (strong
    augmentation off for the last epochs). A transform with `keyed = True` is called with
    the sample's key too (CAM-guided crops look up its map). With `transform=None` nothing
    is decoded here: samples come out as (encoded bytes as a uint8 tensor, label, pass),
    for a pipeline that decodes whole batches on the GPU.
    """

    def __init__(self, split: Split, transform, rank: int, world: int, seed: int, start_pass: int = 0,
                 shuffle_buffer: int = 2000, label_shuffling: bool = False, plain_transform=None,
                 plain_from_pass: int | None = None, batch_size: int = 1, max_steps: int | None = None):
        self.split, self.transform, self.rank, self.world = split, transform, rank, world
        self.seed, self.start_pass, self.shuffle_buffer = seed, start_pass, shuffle_buffer
        self.label_shuffling = label_shuffling
        self.plain_transform, self.plain_from_pass = plain_transform, plain_from_pass
        self.batch_size, self.bad = batch_size, BadImages()
        self.steps = steps_per_pass(self.samples_per_pass(), world, batch_size)
        self.limit = None
        if max_steps and max_steps < self.steps:
            self.steps, self.limit = max_steps, max_steps * batch_size

    def samples_per_pass(self) -> int:
        """Draws of one pass over all ranks (n, or C x N label-shuffled)."""
        return pass_draws(self._labels(), self.label_shuffling)

    def _labels(self) -> np.ndarray:
        """The split's labels by position, read once per process (no image bytes)."""
        if getattr(self, "_labels_cache", None) is None:
            self._labels_cache = self.split.all_labels()
        return self._labels_cache

    def plan(self, p: int) -> PassPlan:
        return plan_pass(self.split, self._labels(), self.world, self.seed, p, self.label_shuffling, self.limit)

    def _streamed(self, plan: PassPlan, slot: int, nslots: int) -> Iterator[Sample]:
        """This slot's samples of the rank's shards, each as many times as it is drawn."""
        shards = plan.shards_of(self.rank)
        for shard in shards[slot::nslots] if plan.by_shard else shards:
            positions = self._positions(shard)
            for n, s in enumerate(self.split.iter_raw(shard.url)):
                pos = positions[n]
                if pos < 0 or not plan.copies[pos]:
                    continue
                if not plan.by_shard and (plan.owner[pos] != self.rank or pos // self.world % nslots != slot):
                    continue
                data = s.data or _read(s.key)  # a folder layout is read per file
                for _ in range(plan.copies[pos]):
                    yield Sample(s.key, data, s.label)

    def _positions(self, shard) -> np.ndarray:
        """Position of each of a shard's samples (-1: held out of this split)."""
        src = np.arange(shard.source_start, shard.source_start + shard.source_size)
        kept = np.ones(len(src), dtype=bool) if self.split.exclude is None else ~np.isin(src, self.split.exclude)
        return np.where(kept, shard.start + np.cumsum(kept) - 1, -1)

    def _one_pass(self, p: int, slot: int, nslots: int) -> Iterator[Sample]:
        """Loader slot `slot` of `nslots`'s samples of pass p, in order."""
        plan = self.plan(p)
        seed = pass_seed(self.seed, p)
        if self.split.records is not None:
            mine = plan.draws(self.rank)
            np.random.default_rng(seed).shuffle(mine)
            for i in mine[slot::nslots]:
                yield self.split.records[i]
            return
        rng = random.Random(seed)
        buffer: list[Sample] = []
        for s in self._streamed(plan, slot, nslots):
            buffer.append(s)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def transform_for(self, p: int):
        plain = self.plain_transform is not None and self.plain_from_pass is not None and p >= self.plain_from_pass
        return self.plain_transform if plain else self.transform

    def items(self, p: int, slot: int, nslots: int) -> Iterator[tuple]:
        """Pass p of this slot as training items: (image, label), or (encoded bytes, label,
        pass) without a transform; an undecodable image is skipped and counted (the loop
        fails the run past data.max_bad_images)."""
        if self.transform is None:
            for s in self._one_pass(p, slot, nslots):
                yield torch.frombuffer(bytearray(s.data), dtype=torch.uint8), s.label, p
            return
        tf = self.transform_for(p)
        keyed = getattr(tf, "keyed", False)
        for s in self._one_pass(p, slot, nslots):
            img = try_decode(s.data, self.bad)
            if img is not None:
                yield (tf(img, s.key) if keyed else tf(img)), s.label

    def __iter__(self):
        slot, nslots = _slots()
        p = self.start_pass
        while True:
            yield from self.items(p, slot, nslots)
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
