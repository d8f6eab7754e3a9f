"""An evaluation's result as a typed report: what `ensemble.core.evaluation.evaluate` returns,
what report.json holds (`Report.as_dict`, the fixed schema the CLI writes).

Each member's row carries timm's validation fields where they apply (`top1_err`,
`top5_err`, `param_count`, `img_size`, `crop_pct`; timm's `validate.py` reports top-1/top-5
accuracy and these), with NLL, ECE and their 95% intervals."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Row(BaseModel):
    # a row also keeps what the scoring adds (NLL, ECE, intervals as `<metric>_ci`)
    model_config = ConfigDict(extra="allow")


class MemberResult(Row):
    name: str
    top1_err: float
    top5_err: float
    nll: float
    ece: float
    param_count: int | None = None  # from the member's record (None for records written before it was kept)
    img_size: int | None = None  # the input size the member is evaluated at
    crop_pct: float | None = None  # crop / resize of its evaluation transform
    # its inference cost (ensemble/core/costs.py), TTA views included; None for records without one
    macs: float | None = None
    infer_ms_b1: float | None = None
    infer_images_per_s_b64: float | None = None
    infer_peak_mb: float | None = None
    cost_machine: str | None = None


class EnsembleResult(Row):
    method: str
    members: list[str]
    top1_err: float
    top5_err: float
    gain_top1_over_best: float
    gain_top5_over_best: float
    best_member_top1: str
    best_member_top5: str
    best_member_chosen_on: str


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: dict
    protocol: dict
    members: list[MemberResult]
    ensemble: EnsembleResult
    best_member: dict
    size_curve: list[dict]
    size_curve_samples: int
    selection: dict | None
    tta: dict
    disagreement: dict
    accuracy_cost: dict | None = None  # members, ensembles and the front of top-1 error against multiply-adds
    reliability: dict = Field(default_factory=dict, exclude=True)  # the ensemble's reliability curve (plotted)

    def as_dict(self) -> dict:
        """report.json's content."""
        return self.model_dump()

    def member(self, name: str) -> MemberResult:
        return next(m for m in self.members if m.name == name)
