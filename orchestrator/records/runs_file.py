"""`runs.yaml`: the contract between a training job and `ensemble.evaluate`.

    version: 1
    ensemble: <name>
    mlflow: {tracking_uri, experiment, parent_run_id}     # optional
    dataset: {name, uri, split, num_classes, labels}      # the reported split (val)
    minival: {name, uri, split, num_classes, labels}      # optional: the split choices are made on
    choices: [{what, split, samples}]                     # optional: which rows chose what
    members: [{name, arch, checkpoint, predictions, minival_predictions, eval, weight, ...}]

New fields are optional: a version-1 file written by hand or by an older version still
evaluates (the evaluation then holds out part of the reported split to choose on).

Unknown keys are rejected, so a hand-edited file fails loudly instead of being half-read.
"""
from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal

import fsspec
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from orchestrator.data.split_ref import SplitRef
from orchestrator.base.errors import UserError, key_hint
from orchestrator.base.storage import retry


# a split is stored by its name (orchestrator/data/split_ref.py)
SplitName = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, SplitRef) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowRef(_Strict):
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None


class DatasetRef(_Strict):
    name: str
    uri: str
    split: SplitName = "val"
    num_classes: int = Field(ge=1)
    samples: int | None = None
    labels: str
    classes: int | list[str] | None = None  # the subset, as in the training config's data section
    per_class: int | None = None
    class_names: list[str] | None = None


class EvalRef(_Strict):
    input_size: int
    resize: int
    crop: int
    mean: list[float]
    std: list[float]


class Choice(_Strict):
    """One thing chosen, and the rows that chose it (never the rows that are reported)."""

    what: str
    split: SplitName
    samples: int | None = None
    # when the rows are part of `split`: the seeded share that chose (ensemble.core.protocol)
    fraction: float | None = Field(None, gt=0, lt=1)
    seed: int | None = None


class MemberRecord(_Strict):
    name: str
    key: str
    arch: str
    status: Literal["finished", "failed"] = "finished"
    checkpoint: str | None = None
    predictions: str | None = None  # on `dataset` (reported)
    minival_predictions: str | None = None  # on `minival` (chosen on), when the runs file has one
    eval: EvalRef
    low_res: bool = True
    weight: float = 1.0
    mlflow_run_id: str | None = None
    seed: int = 0
    recipe: str = "default"
    metrics: dict[str, float] = {}
    cost_machine: str | None = None  # where its inference cost (metrics: macs, infer_*) was measured
    error: str | None = None
    role: str | None = None  # "student of <ensemble>", "twin of <student>": not an ensemble member unless asked


class RunsFile(_Strict):
    version: Literal[1] = 1
    ensemble: str
    mlflow: MlflowRef | None = None
    dataset: DatasetRef
    minival: DatasetRef | None = None
    choices: list[Choice] = []
    members: list[MemberRecord]

    def ensemble_members(self, with_roles: bool = False) -> list[MemberRecord]:
        """The members the ensemble is made of: every finished one, students and twins
        (members with a role) only when asked."""
        return [m for m in self.members if m.status == "finished" and (with_roles or m.role is None)]


def load_runs(path: str) -> RunsFile:
    """Read and validate a runs file from a local path, s3:// or any fsspec URL."""
    try:
        with fsspec.open(path, "r") as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict):
            raise UserError(f"{path} must be a mapping with version, ensemble, dataset and members; "
                            f"it holds {'nothing' if raw is None else type(raw).__name__}")
        return RunsFile.model_validate(raw)
    except FileNotFoundError:
        raise UserError(f"runs file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {yaml_problem(exc)}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        what = f"unknown key{key_hint(RunsFile, err['loc'])}" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"{path}: {where}: {what}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's problem and where it is: 'line L, column C: ...'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def write_runs(path: str, runs: RunsFile) -> None:
    """Write locally atomically (a crash mid-write never leaves a truncated runs.yaml), or
    as one object PUT to s3:// and other fsspec URLs (also all-or-nothing)."""
    text = yaml.safe_dump(runs.model_dump(mode="json"), sort_keys=False)
    if "://" in path and not path.startswith("file://"):
        def put():
            with fsspec.open(path, "w") as f:
                f.write(text)
        retry(put, f"writing {path}")
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".runs-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; runs files are shared
    os.replace(tmp, path)
