"""Which samples a training pass visits, and in what order.

Plain passes are a seeded permutation of the split. Label shuffling is the class
balancing of the Hikvision ILSVRC/Places2 2016 entry (../shared/docs/BACKGROUND.md):
sort by class, let N be the size of the largest class, give every class N samples by
taking a random permutation of range(N) modulo the class size, concatenate, shuffle
globally; a new list each epoch. Either order is then cut into disjoint, equal-length
parts, one per Ray Train worker.

A streamed split (too big to hold) gets the same draws without random access:
`streamed_copies` says how many times each sample is used this pass (floor(N/n) or
ceil(N/n), exactly N per class over all ranks together), and each rank streams its own
shards, yielding each sample that many times through a shuffle buffer. The ceil(N/n)
samples of each class are chosen so that the ranks' totals come out equal; of the C x N
draws, the `C x N mod world` left over are dropped (as `rank_part` drops them), the
per-class count of at most that many draws falling to N - 1.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


def pass_seed(seed: int, p: int) -> int:
    """The seed of pass p of a member seeded `seed`: its order, its shard order and, in the
    resident mode, every draw of the pass."""
    return seed * 1_000_003 + p


def label_shuffled_order(labels: Sequence[int], seed: int) -> list[int]:
    """Sample indices of one epoch: exactly N per class (N = largest class), each class's
    samples used floor(N/n) or ceil(N/n) times, globally shuffled."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    n_max = max(len(v) for v in by_class.values())
    parts = [np.asarray(idx)[rng.permutation(n_max) % len(idx)] for _, idx in sorted(by_class.items())]
    order = np.concatenate(parts)
    rng.shuffle(order)
    return order.tolist()


def epoch_order(labels: Sequence[int], seed: int, label_shuffling: bool) -> list[int]:
    if label_shuffling:
        return label_shuffled_order(labels, seed)
    order = np.random.default_rng(seed).permutation(len(labels))
    return order.tolist()


def rank_part(order: list[int], rank: int, world: int) -> list[int]:
    """This rank's positions of `order`: disjoint across ranks, equal lengths (the few
    left over are dropped, so every DDP rank takes the same number of steps)."""
    return order[rank::world][: len(order) // world]


def epoch_length(labels: Sequence[int], label_shuffling: bool) -> int:
    if not label_shuffling:
        return len(labels)
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return int((counts > 0).sum() * counts.max())


def streamed_copies(labels: np.ndarray, owner: np.ndarray, world: int, seed: int,
                    skip: np.ndarray | None = None) -> np.ndarray:
    """Times each sample is drawn in a label-shuffled pass of a streamed split, where
    `owner[i]` is the rank that reads sample i (its shard's rank). Every class gets N
    draws (N = its largest class) over all ranks together, each of its samples floor(N/n)
    or ceil(N/n) of them; the ceil ones are placed so that each rank's total is exactly
    (C x N) // world. Only where that is impossible (a class too small and too unevenly
    spread over the ranks) are more draws dropped, so that the ranks' parts stay equal.
    Memory: a few integers per sample, nothing per image byte. Samples at `skip` (a
    minival held out of this split) are never drawn."""
    rng = np.random.default_rng(seed)
    labels, owner = np.asarray(labels, dtype=np.int64).copy(), np.asarray(owner, dtype=np.int64)
    if skip is not None and len(skip):
        labels[np.asarray(skip)] = labels.max() + 1  # a class of their own, dropped below
        skipped = int(labels.max())
    else:
        skipped = None
    counts = np.bincount(labels)
    counts_all = counts.copy()  # with the skipped pseudo-class, for slicing the sort below
    if skipped is not None:
        counts[skipped] = 0
    present = np.flatnonzero(counts)
    n_max = int(counts.max())
    n = counts[labels]
    copies = np.where(n > 0, n_max // np.maximum(n, 1), 0).astype(np.int32)  # every sample: floor(N/n)
    target = len(present) * n_max // world
    need = target - np.bincount(owner, weights=copies, minlength=world).astype(np.int64)
    plain: dict[int, list[list[int]]] = {}  # class -> rank -> its samples without an extra draw
    extra: dict[int, list[list[int]]] = {}  # class -> rank -> its samples with one
    # each class's samples in index order, from one sort (not a scan of all labels per class)
    by_label = np.argsort(labels, kind="stable")
    ends = np.cumsum(np.bincount(labels))
    for c in rng.permutation(present):  # the N mod n extra draws of class c, placed where needed
        members = by_label[ends[c] - counts_all[c]:ends[c]]
        plain[c] = [list(rng.permutation(members[owner[members] == r])) for r in range(world)]
        extra[c] = [[] for _ in range(world)]
        for _ in range(n_max % int(counts[c])):
            r = max((k for k in range(world) if plain[c][k]), key=lambda k: need[k])
            extra[c][r].append(plain[c][r].pop())
            need[r] -= 1
    _move_extras(plain, extra, need)
    for i in (i for c in extra for part in extra[c] for i in part):
        copies[i] += 1
    have = target - need
    for r in np.flatnonzero(have > have.min()):  # only if balancing was impossible
        drawn = np.flatnonzero((owner == r) & (copies > 0))
        for i in rng.choice(np.repeat(drawn, copies[drawn]), int(have[r] - have.min()), replace=False):
            copies[i] -= 1
    return copies


def _move_extras(plain: dict, extra: dict, need: np.ndarray) -> None:
    """Shift extra draws between ranks within a class (a sample of the class on the rank
    over its share gives its extra draw to one on a rank under it) until the ranks are
    even or no such pair is left."""
    moved = True
    while moved and (need < 0).any() and (need > 0).any():
        moved = False
        for over in np.flatnonzero(need < 0):
            for under in np.flatnonzero(need > 0):
                for c in extra:
                    while need[over] < 0 and need[under] > 0 and extra[c][over] and plain[c][under]:
                        plain[c][over].append(extra[c][over].pop())
                        extra[c][under].append(plain[c][under].pop())
                        need[over] += 1
                        need[under] -= 1
                        moved = True
