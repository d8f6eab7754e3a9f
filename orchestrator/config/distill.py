"""Distillation in the config: a recipe's `distill` (what the training core needs: the
teacher ensemble, T and alpha) and an ensemble config's `distill:` step (a student and its
plain twin, trained after the members; orchestrator/train/distill.py has the loss)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.config.strict import Strict

THIS_JOB = "members"  # distill.teacher: this job's own finished members


class DistillTeacher(Strict):
    """The ensemble to learn from: the finished members of a runs file (students and
    twins left out), combined as `ensemble.evaluate` combines them by default."""

    runs: str = Field(description="runs file of the teacher ensemble (local, s3:// or any fsspec URL)")
    members: list[str] | None = Field(None, description="only these members (default: every finished one)")
    combination: Literal["mean", "geometric"] = "mean"


class Distill(Strict):
    """Hinton et al. 2015: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the
    member's own loss (label smoothing, confusion prior and mixup/cutmix apply to it)."""

    teacher: DistillTeacher
    temperature: float = Field(4.0, gt=0, description="T: both distributions softened by it")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft term; 0 is plain training on the labels")


class Student(Strict):
    arch: str
    recipe: str = Field("default", description="a recipe of this config; its distill is set by the step")
    seed: int | list[int] = Field(0, description="a list: one student and twin per seed, trained side by side")
    input_size: int | None = Field(None, ge=16)
    name: str | None = None  # default: student-<arch>-s<seed>; with several seeds, <name>-s<seed>

    def seeds(self) -> list[int]:
        return self.seed if isinstance(self.seed, list) else [self.seed]

    def name_for(self, seed: int) -> str:
        if self.name is None:
            return f"student-{self.arch}-s{seed}"
        return self.name if isinstance(self.seed, int) else f"{self.name}-s{seed}"


class DistillStep(Strict):
    """After the members: a student trained on the ensemble's softened predictions and, on
    the same images, epochs and seed, its plain twin (labels only), for a like-for-like figure."""

    teacher: str = Field(THIS_JOB, description=f"'{THIS_JOB}' (this job's) or a runs file")
    teacher_members: list[str] | None = Field(None, description="only these members of the teacher")
    student: Student
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    twin: bool = Field(True, description="train the plain twin too")
