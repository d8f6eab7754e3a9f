"""What an evaluation does, as one typed options object (`ensemble.core.evaluation.evaluate`
takes it; `python -m ensemble.evaluate` builds it from its flags)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the combination each method scores with (ensemble/core/math.py: combine)
METHODS = {"mean_softmax": "mean", "weighted": "mean", "geometric": "geometric"}


class EvaluateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mean_softmax", "weighted", "geometric"] = Field(
        "mean_softmax", description="mean_softmax, weighted (weights from runs.yaml), geometric (= logit mean)")
    select: Literal["none", "greedy"] = Field(
        "none", description="greedy: Caruana ensemble selection with replacement on the selection rows")
    select_rounds: int | None = Field(None, ge=1, description="greedy steps (default: 2 x members)")
    select_metric: Literal["nll", "top1", "top5"] = "nll"
    calibrate: bool = Field(False, description="per-member temperature scaling on the selection rows")
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="part of the split held out to choose on, "
                                                                   "when nothing else is (no minival)")
    tta: Literal["none", "flip", "10crop", "multiscale"] = Field(
        "none", description="per-member test-time augmentation (recomputes predictions from checkpoints)")
    random_orders: int = Field(3, ge=0, description="random orders averaged in the size curve")
    curve_samples: int = Field(10_000, ge=1, description="rows the size curve is scored on (a seeded subset)")
    recompute: bool = Field(False, description="ignore cached predictions, run the checkpoints")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% intervals")
    seed: int = 0
    budget_macs: float | None = Field(None, gt=0, description="greedy selection within this many multiply-adds "
                                                             "per image (the ensemble's distinct members, TTA views included)")
    budget_ms: float | None = Field(None, gt=0, description="greedy selection within this many milliseconds per image at "
                                                           "batch 1 (the members' stored measured cost)")
    only: list[str] | None = Field(None, description="only these members (by name; a student or twin named is "
                                                     "taken): one member served or scored alone")
    with_students: bool = Field(False, description="also score members with a role (distilled students, "
                                                     "their plain twins) as ensemble members")
    log_mlflow: bool = Field(True, description="log metrics and plots to the runs file's MLflow parent run")
    log_model: bool = Field(False, description="also log the ensemble as one MLflow pyfunc model")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget_macs is not None and self.budget_ms is not None:
            raise ValueError("give one budget: budget_macs or budget_ms")
        if (self.budget_macs or self.budget_ms) and self.select != "greedy":
            raise ValueError("a budget bounds greedy selection: add select='greedy' (--select greedy)")
        return self

    @property
    def budget(self) -> tuple[str, float] | None:
        """("macs" | "ms", the limit), or None."""
        if self.budget_macs is not None:
            return "macs", self.budget_macs
        return ("ms", self.budget_ms) if self.budget_ms is not None else None

    @property
    def combination(self) -> str:
        return METHODS[self.method]
