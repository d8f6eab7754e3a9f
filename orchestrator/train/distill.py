"""Distillation: one network trained on an ensemble's softened predictions.

Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network": the
student's loss is

    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard(student, labels)

where x_T is a softmax at temperature T, T^2 keeps the soft term's gradients on the scale of
the hard term's as T changes (their section 2), and `hard` is the member's own loss: the
cross-entropy against its targets with label smoothing, the confusion prior, or the
mixup/cutmix soft labels, exactly as a plain member trains (alpha = 0 is plain training).

The teacher is the ensemble as `ensemble.evaluate` computes it: the finished members of a
runs file (students and twins left out), each in eval mode on its own eval geometry,
combined by the mean of their softmaxes (or the geometric mean), optionally weighted. An
ensemble has no logits; its softened distribution is softmax(log p / T), which for one
member is exactly softmax(z / T). The teacher sees the student's augmented batch, the same
images the student sees at that step (Beyer et al. 2022, "Knowledge distillation: a good
teacher is patient and consistent"): with mixup or cutmix, the mixed image; with
multi-scale training, the rescaled one. A member whose input size or normalisation differs
from the student's gets the batch resized (bilinear, antialiased) and renormalised; where
they match, the teacher's output on an eval-transform image is the member's stored
prediction and the combination is the evaluation's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.core.math import EPS, Combiner


class TeacherEnsemble(nn.Module):
    """Frozen members, each with its eval geometry, whose combined probabilities are the
    ensemble's. `geometry[i] = (input_size, mean, std)`; the student's is `student`."""

    def __init__(self, members: list[nn.Module], geometry: list[tuple[int, list, list]],
                 student: tuple[int, list, list], weights: list[float] | None = None, method: str = "mean"):
        super().__init__()
        self.members = nn.ModuleList(members).eval().requires_grad_(False)
        self.geometry, self.student, self.method = geometry, student, method
        self.weights = weights or [1.0] * len(members)

    def train(self, mode: bool = True):  # always in eval mode: batch norm uses its running statistics
        return super().train(False)

    def _view(self, images: torch.Tensor, geometry) -> torch.Tensor:
        size, mean, std = geometry
        s_size, s_mean, s_std = self.student
        if (mean, std) != (s_mean, s_std):
            shape = (1, -1, 1, 1)
            raw = images * torch.tensor(s_std, device=images.device).view(shape) + torch.tensor(
                s_mean, device=images.device).view(shape)
            images = (raw - torch.tensor(mean, device=images.device).view(shape)) / torch.tensor(
                std, device=images.device).view(shape)
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        comb = Combiner(self.method)
        for model, geometry, w in zip(self.members, self.geometry, self.weights):
            comb.add(model(self._view(images, geometry)).float().softmax(1), w)
        return comb.result()


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the ensemble's distribution at temperature T."""
    return (probs.clamp_min(EPS).log() / temperature).softmax(1)


class DistillLoss(nn.Module):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard(logits, labels).
    `sees_images`: the training loop passes the batch, which the teacher runs on."""

    sees_images = True

    def __init__(self, hard: nn.Module, teacher: nn.Module, temperature: float, alpha: float):
        super().__init__()
        self.hard, self.teacher, self.temperature, self.alpha = hard, teacher, temperature, alpha

    def soft(self, logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        target = soften(teacher_probs, t)
        log_student = F.log_softmax(logits.float() / t, dim=1)
        kl = (target * (target.clamp_min(EPS).log() - log_student)).sum(dim=1).mean()
        return kl * t * t

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:  # plain training: the teacher is not even run
            return self.hard(logits, labels)
        soft = self.soft(logits, self.teacher(images))
        if self.alpha == 1:
            return soft
        return self.alpha * soft + (1 - self.alpha) * self.hard(logits, labels)
