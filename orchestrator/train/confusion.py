"""Label smoothing with a confusion prior (Hikvision, ILSVRC/Places2 2016).

Uniform label smoothing (Szegedy et al. 2016) gives every wrong class eps / C. The
Hikvision entry instead gave the smoothing mass to the few classes most confused with
the true one (../shared/docs/BACKGROUND.md). The confusion comes from a trained member's
cached predictions: row y of the *soft* confusion matrix is the mean predicted
distribution over samples of class y (counts of arg-max errors are too sparse on small
splits). Its k largest off-diagonal entries, renormalised, are the prior of class y.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def confusion_prior(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[C, C] row-stochastic prior: row y spreads over the k classes most confused with y."""
    n_classes = probs.shape[1]
    soft = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(soft, labels, probs.astype(np.float64))
    np.fill_diagonal(soft, 0.0)
    k = min(k, n_classes - 1)
    prior = np.zeros_like(soft)
    for y in range(n_classes):
        top = np.argsort(-soft[y], kind="stable")[:k]
        mass = soft[y, top]
        # a class never confused (or never seen) falls back to uniform over its top-k
        prior[y, top] = mass / mass.sum() if mass.sum() > 0 else 1.0 / k
    return prior


def smoothing_matrix(prior: np.ndarray, eps: float) -> torch.Tensor:
    """S with target(y) = S[y] = (1 - eps) * onehot(y) + eps * prior[y]."""
    return torch.as_tensor((1 - eps) * np.eye(len(prior)) + eps * prior, dtype=torch.float32)


class PriorSmoothingLoss(nn.Module):
    """Cross-entropy against the smoothed targets; soft (mixup/cutmix) labels are mixed
    the same way, target = labels @ S."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() == 1:
            return self.matrix[labels]
        return labels.float() @ self.matrix

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = self.targets(labels).to(logits.device)
        return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
