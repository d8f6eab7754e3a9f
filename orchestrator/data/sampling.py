"""How many times each sample is drawn in a training pass, and how a pass is cut into steps.

A pass draws every sample once (plain), or, with label shuffling, every class N times
(N = its largest class): the class balancing of the Hikvision ILSVRC/Places2 2016 entry
(../shared/docs/BACKGROUND.md), where each class's samples are used floor(N/n) or
ceil(N/n) times and the list is drawn anew each epoch. The draws are counts per sample
(`pass_copies`), not a list of indices, so a streamed split too big to hold gets them
without random access: each rank streams its own shards and yields each sample as many
times as it is drawn. Both data modes, streamed and resident, draw from these counts
(orchestrator/data/passes.py), so a pass visits the same samples in either.

The ranks' parts are equal to within one draw (T // world, one more for the first
T mod world ranks, T the pass's draws), so no draw is dropped; `batch_sizes` cuts every
rank's part into the same number of steps, and DDP ranks step together.
"""
from __future__ import annotations

import numpy as np


def pass_seed(seed: int, p: int) -> int:
    """The seed of pass p of a member seeded `seed`: its draws, its shard order and, in the
    resident mode, every random draw of its augmentations."""
    return seed * 1_000_003 + p


def pass_draws(labels: np.ndarray, label_shuffling: bool) -> int:
    """T, the draws of one pass over all ranks: n, or C x N with label shuffling."""
    if not label_shuffling:
        return len(labels)
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return int((counts > 0).sum() * counts.max())


def rank_targets(total: int, world: int) -> np.ndarray:
    """Each rank's draws: T // world, and one more for the first T mod world ranks."""
    return total // world + (np.arange(world) < total % world)


def steps_per_pass(total: int, world: int, batch: int) -> int:
    """Steps of one pass, the same on every rank (its largest part, in batches)."""
    return max(1, -(-int(rank_targets(total, world).max()) // batch))


def batch_sizes(n: int, batch: int, steps: int) -> list[int]:
    """A part of n draws cut into `steps` batches of at most `batch`: full batches, then
    the rest spread evenly over the last ones, so no step trains on a batch of one
    (BatchNorm cannot) when n is a batch and one. Needs n >= steps."""
    if n < steps:
        raise ValueError(f"{n} draws cannot fill {steps} steps")
    full = min(max(steps - 2, 0), n // batch)
    while full and n - full * batch < steps - full:  # (only when undecodable images shortened the pass)
        full -= 1
    rest, parts = n - full * batch, steps - full
    return [batch] * full + [rest // parts + (k < rest % parts) for k in range(parts)]


def pass_copies(labels: np.ndarray, owner: np.ndarray, world: int, seed: int, label_shuffling: bool) -> np.ndarray:
    """Times each sample is drawn this pass, where `owner[i]` is the rank that reads
    sample i. Every rank's total is its `rank_targets` share. Plain, every sample once;
    with label shuffling every class N times over all ranks together, each of its
    samples floor(N/n) or ceil(N/n) times, the ceil ones placed so that the ranks' totals
    come out right. Only where that is impossible (a class too small and too unevenly
    spread over the ranks; plain, shards of uneven sizes) does a rank drop draws or draw
    some of its samples once more. Memory: a few integers per sample."""
    rng = np.random.default_rng(seed)
    labels, owner = np.asarray(labels, dtype=np.int64), np.asarray(owner, dtype=np.int64)
    targets = rank_targets(pass_draws(labels, label_shuffling), world)
    if not label_shuffling:
        copies = np.ones(len(labels), dtype=np.int32)
    else:
        copies = _balanced_copies(labels, owner, world, targets, rng)
    _to_targets(copies, owner, targets, rng)
    return copies


def _balanced_copies(labels, owner, world, targets, rng) -> np.ndarray:
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    n_max = int(counts.max())
    copies = np.where(counts[labels] > 0, n_max // np.maximum(counts[labels], 1), 0).astype(np.int32)  # floor(N/n)
    need = targets - np.bincount(owner, weights=copies, minlength=world).astype(np.int64)
    plain: dict[int, list[list[int]]] = {}  # class -> rank -> its samples without an extra draw
    extra: dict[int, list[list[int]]] = {}  # class -> rank -> its samples with one
    by_label = np.argsort(labels, kind="stable")  # each class's samples from one sort
    ends = np.cumsum(counts)
    for c in rng.permutation(present):  # the N mod n extra draws of class c, placed where needed
        members = by_label[ends[c] - counts[c]:ends[c]]
        plain[c] = [list(rng.permutation(members[owner[members] == r])) for r in range(world)]
        extra[c] = [[] for _ in range(world)]
        for _ in range(n_max % int(counts[c])):
            r = max((k for k in range(world) if plain[c][k]), key=lambda k: need[k])
            extra[c][r].append(plain[c][r].pop())
            need[r] -= 1
    _move_extras(plain, extra, need)
    for i in (i for c in extra for part in extra[c] for i in part):
        copies[i] += 1
    return copies


def _to_targets(copies: np.ndarray, owner: np.ndarray, targets: np.ndarray, rng) -> None:
    """Bring each rank's total to its target: drop random draws, or draw random samples of
    its own once more."""
    have = np.bincount(owner, weights=copies, minlength=len(targets)).astype(np.int64)
    for r in np.flatnonzero(have != targets):
        mine = np.flatnonzero(owner == r)
        if have[r] > targets[r]:
            drawn = np.repeat(mine, copies[mine])
            np.subtract.at(copies, rng.choice(drawn, int(have[r] - targets[r]), replace=False), 1)
        elif len(mine):
            more = int(targets[r] - have[r])
            np.add.at(copies, rng.choice(mine, more, replace=more > len(mine)), 1)


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
