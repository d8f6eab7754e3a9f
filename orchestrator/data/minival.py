"""A held-out *minival* carved from train: the split every choice is made on.

Anything chosen on the split that is then reported flatters the report: the epoch whose
checkpoint is kept, a Tune trial's rank, the members a search or Caruana selection picks,
fitted temperatures, a confusion prior's statistics. With `data.minival: m` every such
choice is made on m samples per class held out of train (never trained on), and val is
scored once, at the end, only to be reported (the protocol of ILSVRC entries that kept a
"minival" of the training set, e.g. Szegedy et al. 2016 "Rethinking the Inception
Architecture", and of Ashukha et al. 2020 for temperature scaling).

Carving is deterministic: per class, a permutation seeded by (minival_seed, class) picks
the class's m held-out samples, so every rank, loader, resume and evaluation agrees
without a stored list. The two parts are `SplitRef`s (orchestrator/data/split_ref.py),
named `<train>@minival:<m>:<seed>` and `<train>@rest:<m>:<seed>` (`open_split` opens
either), so a runs file can name the minival and the evaluation can recompute on it.
A train split held in memory is carved in memory; a streamed one (too big to hold) is
carved by its labels (the manifest's labels file): only the minival's samples are held,
and the rest streams with them skipped (`dataset.carve_minival`).
"""
from __future__ import annotations

import numpy as np

from orchestrator.base.errors import UserError

def carve(labels: list[int], num_classes: int, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(rest, minival): positions into `labels`, each in dataset order."""
    y = np.asarray(labels)
    held = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) <= per_class:
            raise UserError(f"data.minival: {per_class} per class leaves no training sample of class {c} "
                            f"({len(idx)} samples); lower data.minival or raise data.train_per_class")
        perm = np.random.default_rng([seed, c]).permutation(len(idx))
        held.extend(idx[perm[:per_class]].tolist())
    held_set = set(held)
    return [i for i in range(len(y)) if i not in held_set], sorted(held)
