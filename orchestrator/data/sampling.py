"""Which samples a training pass visits, and in what order.

Plain passes are a seeded permutation of the split. Label shuffling is the class
balancing of the Hikvision ILSVRC/Places2 2016 entry (../shared/docs/BACKGROUND.md):
sort by class, let N be the size of the largest class, give every class N samples by
taking a random permutation of range(N) modulo the class size, concatenate, shuffle
globally; a new list each epoch. Either order is then cut into disjoint, equal-length
parts, one per Ray Train worker.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np


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
