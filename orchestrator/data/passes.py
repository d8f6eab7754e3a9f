"""One training pass of a split, the same in both data modes.

A pass p of a member seeded s is planned from (s, p) alone (`plan_pass`): which rank
reads each sample (a streamed split's shards go, in this pass's shuffled order, each to
the rank holding fewest samples, so a shard is read by one rank; in memory, a seeded
permutation dealt round), and how many times each is drawn (sampling.pass_copies). The
streaming path (orchestrator/data/streams.py) reads the rank's shards and yields each
sample that many times through a shuffle buffer; the resident path
(orchestrator/train/resident_batches.py) gathers the same draws by index. So the two modes visit
the same samples in every pass, and an epoch is exactly one pass in both.

Samples are named by position: their index in the split as `Split.iter_samples` yields
it (a minival held out of train is not in it).

`max_steps_per_epoch` caps an epoch below a pass: then each rank keeps the first
steps x batch draws of its part in reading order, so a streamed pass opens only the
shards those draws are in.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from orchestrator.data.dataset import Split
from orchestrator.data.sampling import pass_copies, pass_seed


@dataclass(frozen=True)
class Shard:
    url: str
    rank: int  # the rank that reads it
    source_start: int  # its first sample's index in the manifest's split
    source_size: int  # its samples in the manifest (those held out included)
    start: int  # its samples' positions: [start, stop)
    stop: int


@dataclass
class PassPlan:
    order: np.ndarray  # every position, in reading order
    owner: np.ndarray  # the rank that reads each position
    copies: np.ndarray  # draws of each position this pass
    shards: list[Shard]  # a streamed split's shards in this pass's order ([] in memory)
    by_shard: bool  # each shard read by one rank (else every rank reads all, keeps its own)
    world: int
    dealt: np.ndarray | None = None  # in memory: every draw, in the order dealt to the ranks

    def draws(self, rank: int) -> np.ndarray:
        """This rank's draws (positions, repeated as drawn), in reading order."""
        if self.dealt is not None:
            return self.dealt[rank::self.world]
        mine = self.order[self.owner[self.order] == rank]
        return np.repeat(mine, self.copies[mine])

    def shards_of(self, rank: int) -> list[Shard]:
        """The shards this rank opens: its own with at least one draw (all, when not by shard)."""
        return [s for s in self.shards if (s.rank == rank or not self.by_shard) and self.copies[s.start:s.stop].any()]


def shard_layout(split: Split) -> list[tuple[str, int, int, int, int]]:
    """(url, source start, source size, position start, position stop) of each shard of a
    streamed split."""
    offsets = split.manifest.offsets(split.shard_split)
    sizes = [s.samples for s in split.manifest.shards(split.shard_split)]
    skip = np.zeros(0, dtype=np.int64) if split.exclude is None else np.sort(split.exclude)
    out = []
    for url, off, n in zip(split.urls(), offsets, sizes):
        lo, hi = off - np.searchsorted(skip, off), off + n - np.searchsorted(skip, off + n)
        out.append((url, off, n, int(lo), int(hi)))
    return out


def plan_pass(split: Split, labels: np.ndarray, world: int, seed: int, p: int, label_shuffling: bool,
              limit: int | None = None) -> PassPlan:
    """Pass p of a member seeded `seed` over `split` (whose labels by position are
    `labels`), cut across `world` ranks; `limit`: each rank's draws kept (an epoch capped
    below a pass)."""
    s = pass_seed(seed, p)
    n = len(labels)
    if split.records is not None:
        rng = np.random.default_rng(s)
        copies = pass_copies(labels, np.zeros(n, dtype=np.int64), 1, s, label_shuffling)
        dealt = rng.permutation(np.repeat(np.arange(n), copies))
        if limit is not None:
            dealt = dealt[:limit * world]
        return PassPlan(np.arange(n), np.zeros(n, dtype=np.int64), copies, [], False, world, dealt)
    order, owner, shards, by_shard = _deal_shards(split, n, world, random.Random(s))
    plan = PassPlan(order, owner, pass_copies(labels, owner, world, s, label_shuffling), shards, by_shard, world)
    if limit is not None:
        _keep_first(plan, world, limit)
    return plan


def _deal_shards(split: Split, n: int, world: int, rng: random.Random):
    layout = shard_layout(split)
    rng.shuffle(layout)
    order = np.concatenate([np.arange(lo, hi) for *_, lo, hi in layout]) if layout else np.zeros(0, np.int64)
    owner = np.empty(n, dtype=np.int64)
    by_shard = len(layout) >= world
    held, shards = [0] * world, []
    for url, off, size, lo, hi in layout:
        r = held.index(min(held)) if by_shard else -1
        if by_shard:
            held[r] += hi - lo
            owner[lo:hi] = r
        shards.append(Shard(url, r, off, size, lo, hi))
    if not by_shard:  # fewer shards than ranks: every rank reads all, keeps every world-th sample
        owner = np.arange(n) % world
    return order, owner, shards, by_shard


def _keep_first(plan: PassPlan, world: int, limit: int) -> None:
    """Each rank keeps the first `limit` of its draws in reading order."""
    for r in range(world):
        mine = plan.order[plan.owner[plan.order] == r]
        c = plan.copies[mine].astype(np.int64)
        before = np.cumsum(c) - c
        plan.copies[mine] = np.clip(limit - before, 0, c)
