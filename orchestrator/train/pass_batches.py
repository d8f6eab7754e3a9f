"""Whole passes as training batches from DataLoader processes.

A DataLoader batches inside each loader process, so a pass's last batches would mix two
passes or leave one short batch per process, and an epoch would not be a pass. Here each
loader slot collates its part of pass p into chunks of at most a batch and then says it
is done with p (`PassChunks`); the training process regroups the chunks into the pass's
`steps` batches (`PassBatches`, sizes from sampling.batch_sizes, as the resident mode
cuts its draws), holding a later pass's chunks until every slot has finished the earlier
one. So an epoch is exactly one pass in both data modes, and every rank takes the same
number of steps.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from orchestrator.data.sampling import batch_sizes
from orchestrator.data.streams import TrainStream
from orchestrator.train.batch_augment import collate_encoded, split_encoded


def loader_batches(stream: TrainStream, workers: int, device: torch.device) -> PassBatches:
    """The stream's passes as whole-pass batches, read by `workers` loader processes."""
    chunks = DataLoader(PassChunks(stream), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return PassBatches(chunks, max(workers, 1), stream.steps, stream.batch_size, stream.start_pass,
                       encoded=stream.transform is None)


class PassChunks(IterableDataset):
    """A TrainStream as (chunk, pass) items, each chunk at most a batch, then (None, pass)
    when this loader slot has yielded all of its part of that pass."""

    def __init__(self, stream: TrainStream):
        self.stream = stream

    @property
    def bad(self):
        return self.stream.bad

    def __iter__(self):
        info = get_worker_info()
        slot, nslots = (info.id, info.num_workers) if info else (0, 1)
        collate = collate_encoded if self.stream.transform is None else default_collate
        p = self.stream.start_pass
        while True:
            rows = []
            for item in self.stream.items(p, slot, nslots):
                rows.append(item)
                if len(rows) == self.stream.batch_size:
                    yield collate(rows), p
                    rows = []
            if rows:
                yield collate(rows), p
            yield None, p
            p += 1


class PassBatches:
    """The chunks of `slots` loader slots as `steps` batches a pass, from `start_pass` on:
    (images, labels) decoded, or (encoded images, labels, pass) for the device pipeline."""

    def __init__(self, chunks: Iterable, slots: int, steps: int, batch: int, start_pass: int, encoded: bool):
        self.chunks, self.slots, self.steps, self.batch = chunks, slots, steps, batch
        self.start_pass, self.encoded = start_pass, encoded

    def __iter__(self) -> Iterator[tuple]:
        pending: dict[int, list] = defaultdict(list)
        done: Counter = Counter()
        p, emitted = self.start_pass, 0
        for payload, q in self.chunks:
            q = int(q)
            if payload is None:
                done[q] += 1
            else:
                pending[q].append(self._piece(payload))
            while True:
                while emitted < self.steps - 2 and _count(pending[p]) >= self.batch:  # full batches as they fill
                    batch, pending[p] = _take(pending[p], self.batch)
                    yield self._out(batch, p)
                    emitted += 1
                if done[p] < self.slots:
                    break
                rest = _join(pending.pop(p)) if pending[p] else None  # the pass is complete: its last steps
                at = 0
                for size in batch_sizes(_count([rest]) if rest else 0, self.batch, self.steps - emitted):
                    yield self._out(tuple(part[at:at + size] for part in rest), p)
                    at += size
                del done[p]
                p, emitted = p + 1, 0

    def _piece(self, payload) -> tuple:
        if self.encoded:  # one flat tensor crossed from the loader process; views per image here
            data, lengths, labels, _ = payload
            return split_encoded(data, lengths), labels
        return tuple(payload)

    def _out(self, piece: tuple, p: int) -> tuple:
        return (*piece, p) if self.encoded else piece


def _count(pieces: list) -> int:
    return sum(len(piece[-1]) for piece in pieces if piece)


def _join(pieces: list) -> tuple:
    """One piece from several: tensors concatenated, lists of encoded images chained."""
    return tuple(torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for part in parts for x in part]
                 for parts in zip(*pieces))


def _take(pieces: list, k: int) -> tuple[tuple, list]:
    """(the first k samples as one piece, what is left)."""
    used, n = 0, 0
    while n < k:
        n += len(pieces[used][-1])
        used += 1
    head = _join(pieces[:used])
    left = [tuple(part[k:] for part in head)] if n > k else []
    return tuple(part[:k] for part in head), left + pieces[used:]
