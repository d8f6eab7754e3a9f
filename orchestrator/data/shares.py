"""Disjoint per-class shares of train, one per member: diversity bought with data.

With `data.shares: K` the training images (less the minival) are dealt out class by class,
round-robin in dataset order, into K disjoint shares (equal per class, to within one), and
member i of the config trains on share i mod K. Each member then sees 1/K of the images for
1/K of the cost of all of them, and the members' errors are less alike than when every one
sees the same images: Breiman's "pasting" of small votes, bagging without replacement
(L. Breiman 1999, "Pasting Small Votes for Classification in Large Databases and On-Line",
Machine Learning 36). On a budget that cannot train every member on all of train, it buys
an ensemble gain that different seeds on the same images do not (docs/getting-started.md, "What the first
command shows"). At ImageNet scale members see all of train; leave `shares` unset.

Dealing is deterministic and needs only the labels, so every rank, loader and resume
agrees without a stored list; shards are written shuffled, so dataset order within a
class is already random.
"""
from __future__ import annotations

import numpy as np

def positions(labels, shares: int, share: int) -> np.ndarray:
    """Positions (ascending) into `labels` of share `share` of `shares`: the samples whose
    rank within their class, in dataset order, is share mod shares."""
    y = np.asarray(labels)
    order = np.argsort(y, kind="stable")
    first = np.searchsorted(y[order], y[order], side="left")  # where each sample's class starts
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - first
    return np.flatnonzero(rank % shares == share)
