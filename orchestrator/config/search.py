"""The search section's schema (`jobs/search.py`): the searched dimensions, the Tune
scheduler (ASHA, PBT), and how trials become members (`select`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config.schema import Strict
from orchestrator.base.errors import UserError


SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class Dimension(Strict):
    """One searched field: exactly one of choice / grid (lists), uniform / loguniform /
    randint ([low, high], randint inclusive)."""

    choice: list | None = None
    grid: list | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError(f"a search dimension needs exactly one of {', '.join(SPACE_KINDS)}; "
                            f"got {', '.join(given) or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return list(getattr(self, self.kind))


def check_dimension(path: str, dim: Dimension) -> None:
    v = dim.values
    if dim.kind in ("choice", "grid") and not v:
        raise UserError(f"search.space.{path}: {dim.kind} is empty; give at least one value")
    if dim.kind in ("uniform", "loguniform", "randint") and not v[0] < v[1] + (dim.kind == "randint"):
        raise UserError(f"search.space.{path}: range [{v[0]}, {v[1]}] is empty or reversed; give [low, high]")
    if dim.kind == "loguniform" and v[0] <= 0:
        raise UserError(f"search.space.{path}: loguniform needs a positive low bound, got {v[0]}")


class Asha(Strict):
    grace_period: int = Field(1, ge=1, description="epochs every trial trains before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class Pbt(Strict):
    perturbation_interval: int = Field(1, ge=1, description="epochs between exploit/explore steps")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    mutate: list[str] | None = None  # searched paths PBT perturbs; default: LR and augmentation fields


class Select(Strict):
    size: int = Field(4, ge=1, description="picks of Caruana's selection: at most this many trials become members")
    metric: Literal["nll", "top1", "top5"] = "nll"  # the selection's loss on the selection split
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="val share used to choose; the rest reports")
    budget_macs: float | None = Field(None, gt=0, description="Caruana's choice within this many multiply-adds per "
                                                             "image (the trials' measured cost, models/cost.py)")


class Search(Strict):
    space: dict[str, Dimension] = Field(min_length=1)
    num_samples: int = Field(8, ge=1, description="samples per base member (x the grid dimensions)")
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    asha: Asha = Asha()
    pbt: Pbt = Pbt()
    algorithm: Literal["random", "optuna"] = "random"
    metric: Literal["val_top1_err", "val_top5_err", "val_loss"] = "val_top1_err"
    max_concurrent_trials: int | None = Field(None, ge=1)
    select: Select = Select()

    @model_validator(mode="after")
    def _ranges(self):
        for path, dim in self.space.items():
            check_dimension(path, dim)
        return self
