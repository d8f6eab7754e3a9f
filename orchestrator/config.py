"""One typed config tree for an ensemble job, loaded from YAML; unknown keys rejected.

    name, data, storage, mlflow, ray          -- where things live
    recipes: {name: Recipe}                   -- optimiser, LR policy, augmentation, epochs
    defaults: Member fields shared by all members
    members: [Member]  and/or  grid: {archs x recipes x seeds}

`load_config` expands `${VAR:-default}` from the environment, validates, and raises a
one-line `UserError` on the first problem. `resolve_members` turns the config into the
list of fully specified members, each with a stable key.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import UserError, unknown_name
from orchestrator.train import augment, lr


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Optimizer(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="peak LR per 256 images (scaled linearly with the global batch)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-5, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class Schedule(Strict):
    policy: str = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    # kept as written (so member keys do not move); typed and checked by the policy's
    # own parameter model (orchestrator/train/lr.py): unknown or out-of-range refused
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self):
        lr.parse_params(self.policy, self.params)  # unknown policy or parameter -> UserError
        return self


class Augment(Strict):
    preset: str = "standard"
    overrides: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self):
        augment.resolve(self.preset, self.overrides)
        return self

    def fields(self) -> augment.AugmentFields:
        return augment.resolve(self.preset, self.overrides)


class Teacher(Strict):
    """A trained member to learn from: its name in a runs file (an ensemble's or a search's)."""

    runs: str
    member: str


class CamCrops(Strict):
    """Supervised data augmentation (Hikvision, ILSVRC 2016): crop centres are sampled in
    proportion to the teacher's class activation map of the true class."""

    teacher: Teacher
    probability: float = Field(1.0, ge=0, le=1, description="share of crops that are CAM-guided")


class ConfusionPrior(Strict):
    """Label smoothing whose mass (augment `label_smoothing`) goes to the k classes the
    teacher confuses most with the true one, instead of to all classes (Hikvision)."""

    teacher: Teacher
    k: int = Field(5, ge=1)


class Recipe(Strict):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    # a cap for quick looks and smoke tests (Lightning's limit_train_batches): each epoch
    # stops after this many optimiser steps, the LR schedule is laid out on the capped epochs
    max_steps_per_epoch: int | None = Field(None, ge=1)
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    augment: Augment = Augment()
    # Hikvision 2016 options (../shared/docs/BACKGROUND.md)
    label_shuffling: bool = False  # every class N samples per epoch, N = the largest class
    cam_crops: CamCrops | None = None
    confusion_prior: ConfusionPrior | None = None
    plain_last_epochs: int = Field(0, ge=0, description="strong augmentation off for the last k epochs")
    multiscale: list[int] = Field([], description="train each batch at one of these sizes (px)")
    compile: bool = False  # torch.compile: ~40% faster ResNet-50 on GPU, ~50 s to compile
    channels_last: bool = True  # GPU only
    bf16: bool = True  # autocast on GPU only

    @model_validator(mode="after")
    def _consistent(self):
        if self.confusion_prior and self.augment.fields().label_smoothing <= 0:
            raise UserError("recipe.confusion_prior spreads the label_smoothing mass: set augment "
                            "overrides.label_smoothing > 0")
        if self.plain_last_epochs > self.epochs:
            raise UserError(f"recipe.plain_last_epochs ({self.plain_last_epochs}) exceeds epochs ({self.epochs})")
        if any(s < 16 for s in self.multiscale):
            raise UserError(f"recipe.multiscale sizes must be >= 16 px, got {self.multiscale}")
        return self


class Resources(Strict):
    workers: int = Field(1, ge=1, description="1: trained in its Tune trial; more: Ray Train data-parallel workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # a number, or auto: orchestrator/packing.py decides how many members share a GPU
    gpus_per_worker: Annotated[float, Field(ge=0)] | Literal["auto"] = 1.0
    gpu_memory_gb: float | None = Field(None, gt=0, description="peak GPU memory of one worker, for packing")
    loader_workers: int = Field(1, ge=0, description="DataLoader processes per worker")
    # where JPEGs are decoded and augmented: per image in the loader processes (cpu), per
    # batch on the GPU with nvJPEG (gpu), or gpu when training on CUDA and the recipe's
    # augmentations have a batch form (auto); see orchestrator/train/batch_augment.py
    decode: Literal["auto", "cpu", "gpu"] = "auto"

    @property
    def trial_cpus(self) -> float:
        """CPUs the member's Tune trial holds besides its workers: none when the trial
        trains the member itself (one worker, orchestrator/in_trial.py); a token share
        while it waits on a data-parallel member's TorchTrainer (Tune refuses 0 CPUs)."""
        return 0.0 if self.workers == 1 else 0.25

    def check(self, member: str) -> None:
        """Cross-field rules, checked on the merged resources of a member (a member's own
        `resources:` is a partial override of the defaults and may not be whole)."""
        share_set = "gpus_per_worker" in self.model_fields_set and self.gpus_per_worker != 0
        if share_set and not self.use_gpu:
            raise UserError(f"member {member}: resources.gpus_per_worker is {self.gpus_per_worker} but use_gpu is "
                            f"false; set use_gpu: true to train on GPUs, or drop gpus_per_worker")
        # Fractional GPUs only for single-worker members: two DDP ranks on one GPU fail in NCCL.
        if self.use_gpu and self.workers > 1 and self.gpus_per_worker != "auto" and self.gpus_per_worker < 1:
            raise UserError(f"member {member}: gpus_per_worker < 1 is only allowed with workers: 1 "
                            f"(NCCL cannot share a GPU)")
        if self.decode == "gpu" and not self.use_gpu:
            raise UserError(f"member {member}: resources.decode: gpu needs use_gpu: true "
                            f"(valid without a GPU: auto, cpu)")


class Member(Strict):
    name: str | None = None
    arch: str | None = None
    recipe: str | None = None
    seed: int = 0
    # unset: follows an explicit input_size (on at 64 px and below, off above); with
    # neither set, the architecture's native size with the ImageNet stem
    low_res: bool | None = None
    input_size: int | None = Field(None, ge=16)
    weight: float = Field(1.0, ge=0)
    resources: Resources | None = None


class Grid(Strict):
    archs: list[str] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)
    seeds: list[int] = [0]


class Data(Strict):
    root: str = Field(description="shards dir with manifest.json: local path, s3:// or any fsspec URL")
    train_split: str = "train"
    val_split: str = "val"
    classes: int | list[str] | None = Field(None, description="first N classes, or a list of wnids")
    train_per_class: int | None = Field(None, ge=1)
    val_per_class: int | None = Field(None, ge=1)
    num_classes: int | None = Field(None, description="if given, must agree with the manifest")
    max_bad_images: int = Field(50, ge=0, description="undecodable images skipped per epoch before the run fails")
    # a held-out part of train that makes every choice (per-epoch metrics, Tune's metric,
    # checkpoints, search choice, selection, temperatures, confusion statistics), so val is
    # scored once, at the end, and only reported (orchestrator/data/minival.py)
    minival: int | None = Field(None, ge=1, description="samples per class held out of train, never trained on")
    minival_seed: int = 0
    # train decoded once and held where the model trains (orchestrator/data/resident.py):
    # auto = when its images share one size, the augmentations have a batch form and it fits
    resident: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _minival_fits(self):
        if self.minival and self.train_per_class and self.minival >= self.train_per_class:
            raise UserError(f"data.minival ({self.minival} per class) must be below data.train_per_class "
                            f"({self.train_per_class}): the rest of train is what the members learn from")
        return self

    @property
    def heldout(self) -> str:
        """The split every per-epoch metric and every choice is made on."""
        return "minival" if self.minival else "val"

    def key_fields(self) -> dict:
        """What of the data enters a member's key: minival only when set, so configs
        without it keep their members' keys (a re-run retrains nothing)."""
        d = self.model_dump()
        if self.resident == "auto":  # placement of the decoded split, not identity, unless forced
            d.pop("resident")
        if self.minival is None:
            d.pop("minival"), d.pop("minival_seed")
        return d


class Storage(Strict):
    path: str = "./outputs"  # checkpoints, predictions, member records: local or s3://


class Mlflow(Strict):
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else an embedded SQLite store
    experiment: str = "ensembles"


class RayOpts(Strict):
    address: str | None = None  # else RAY_ADDRESS / the running cluster / a local instance
    max_concurrent_members: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0, description="Ray Train restarts of a member's worker group")


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


class Asha(Strict):
    grace_period: int = Field(1, ge=1, description="epochs every trial trains before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class Pbt(Strict):
    perturbation_interval: int = Field(1, ge=1, description="epochs between exploit/explore steps")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    mutate: list[str] | None = None  # searched paths PBT perturbs; default: LR and augmentation fields


class Select(Strict):
    size: int = Field(4, ge=1, description="how many trials become members")
    metric: Literal["nll", "top1", "top5"] = "nll"  # greedy selection's loss on the selection split
    selection_fraction: float = Field(0.5, gt=0, lt=1, description="val share used to choose; the rest reports")


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
        from orchestrator.search.space import check_dimension

        for path, dim in self.space.items():
            check_dimension(path, dim)
        return self


# K trainers' total images/s over one trainer's on one GPU: ResNet-18 at 32 px on an H200
# (../shared/docs/BACKGROUND.md); bench/pack_bench.py --out measures a cluster's own
H200_PACKING_GAINS = {1: 1.0, 2: 2.32, 4: 3.5, 8: 3.44}


class PackingOpts(Strict):
    """What `gpus_per_worker: auto` is decided from (orchestrator/packing.py)."""

    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one GPU of the cluster")
    gains: dict[int, float] = Field(default_factory=lambda: dict(H200_PACKING_GAINS))
    headroom: float = Field(0.9, gt=0, le=1, description="share of GPU memory the packed members may use")
    min_step_gain: float = Field(1.1, ge=1, description="a larger K must raise total throughput this much")
    saturated: float = Field(0.8, gt=0, description="solo GPU utilisation above which a member is not packed")

    @field_validator("gains")
    @classmethod
    def _gains(cls, v):
        if not v or any(k < 1 or g <= 0 for k, g in v.items()):
            raise ValueError("gains maps members per GPU (>= 1) to a positive throughput ratio")
        return v


class EnsembleConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: Data
    storage: Storage = Storage()
    mlflow: Mlflow = Mlflow()
    ray: RayOpts = RayOpts()
    recipes: dict[str, Recipe] = {"default": Recipe()}
    defaults: Member = Member()
    members: list[Member] = []
    grid: Grid | None = None
    search: Search | None = None  # used by jobs/search.py
    packing: PackingOpts = PackingOpts()
    imported_runs: list[str] = Field([], description="runs files whose finished members join as they are")

    @model_validator(mode="after")
    def _members_present(self):
        if not self.members and self.grid is None and not self.imported_runs:
            raise UserError("config has no members: give `members:`, `grid:` or `imported_runs:`")
        return self


class ResolvedMember(BaseModel):
    """Everything needed to train one member, independent of the config file."""

    model_config = ConfigDict(extra="forbid")
    key: str
    name: str
    arch: str
    recipe_name: str
    recipe: Recipe
    seed: int
    low_res: bool
    input_size: int
    weight: float
    resources: Resources
    packing: str | None = None  # why `gpus_per_worker: auto` came out as it did


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment, as in a shell."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1)) or m.group(2)
        if value is None:
            raise UserError(f"config uses ${{{m.group(1)}}} but it is not set and has no default")
        return value

    return _ENV.sub(sub, text)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    return f"config {where}: {err['msg']}"


def parse_config(raw: dict) -> EnsembleConfig:
    try:
        return EnsembleConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_error(exc)) from None


def parse_recipe(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(["recipe", *(str(p) for p in err["loc"])])
        what = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"{where}: {path}: {what}") from None


def load_config(path: str) -> EnsembleConfig:
    try:
        with open(path) as f:
            raw = yaml.safe_load(expand_env(f.read()))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        from orchestrator.runs_file import yaml_problem

        raise UserError(f"config {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    return parse_config(raw)


def member_key(name: str, payload: dict) -> str:
    """Stable key: the member's name plus a hash of everything that affects its training,
    so an edited recipe trains a new member instead of resuming an incompatible one."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def recipe_payload(recipe: Recipe) -> dict:
    """The recipe as hashed into member keys. Fields added after keys were first issued
    count only when set, so existing members keep their keys (and resume)."""
    out = recipe.model_dump()
    if out["max_steps_per_epoch"] is None:
        del out["max_steps_per_epoch"]
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge(defaults: Member, m: Member) -> Member:
    """Member over defaults over built-ins, field by field in nested sections too: a
    member's `resources: {workers: 2}` keeps the defaults' `use_gpu`."""
    return Member.model_validate(_deep_merge(defaults.model_dump(exclude_unset=True), m.model_dump(exclude_unset=True)))


LOW_RES_MAX = 64  # px: at or below, a unset low_res means the 32-64 px stem


def input_geometry(m: Member, spec) -> tuple[int, bool]:
    """(input size, low_res) with no silent default: see Member.low_res."""
    if m.low_res is None:
        size = m.input_size or spec.eval.input_size
        return size, size <= LOW_RES_MAX
    return m.input_size or (spec.low_res_size if m.low_res else spec.eval.input_size), m.low_res


def _grid_members(grid: Grid) -> list[Member]:
    return [Member(arch=a, recipe=r, seed=s) for a, r, s in itertools.product(grid.archs, grid.recipes, grid.seeds)]


def _pack(name: str, resources: Resources, opts: PackingOpts) -> tuple[Resources, str | None]:
    from orchestrator.packing import resolve_auto

    share, decision = resolve_auto(name, resources, opts)
    return resources.model_copy(update={"gpus_per_worker": share}), decision.reason if decision else None


def _check_decode(name: str, recipe: Recipe, resources: Resources) -> None:
    from orchestrator.train.batch_augment import unsupported

    missing = unsupported(recipe.augment.fields(), recipe.cam_crops is not None)
    if resources.decode == "gpu" and missing:
        raise UserError(f"member {name}: decode: gpu cannot apply {', '.join(missing)} (per-image CPU "
                        f"operations); use decode: cpu or auto, or drop them")


def resolve_members(cfg: EnsembleConfig) -> list[ResolvedMember]:
    """Explicit members first, then the grid product; defaults fill unset fields."""
    from models import get_spec

    out: list[ResolvedMember] = []
    for m in cfg.members + (_grid_members(cfg.grid) if cfg.grid else []):
        m = _merge(cfg.defaults, m)
        if m.arch is None:
            raise UserError(f"member {m.name or len(out)} has no `arch`")
        spec = get_spec(m.arch)
        recipe_name = m.recipe or "default"
        if recipe_name not in cfg.recipes:
            raise unknown_name("recipe", recipe_name, cfg.recipes)
        recipe = cfg.recipes[recipe_name]
        size, low_res = input_geometry(m, spec)
        if low_res and size < spec.min_low_res_size:
            raise UserError(f"{m.arch} needs input_size >= {spec.min_low_res_size} in its low-res form, got {size}")
        name = m.name or f"{m.arch}-{recipe_name}-s{m.seed}"
        resources = m.resources or Resources()
        resources.check(name)
        _check_decode(name, recipe, resources)
        resources, packing = _pack(name, resources, cfg.packing)
        payload = {"arch": m.arch, "recipe": recipe_payload(recipe), "seed": m.seed, "low_res": low_res,
                   "input_size": size, "workers": resources.workers, "data": cfg.data.key_fields()}
        out.append(ResolvedMember(key=member_key(name, payload), name=name, arch=m.arch, recipe_name=recipe_name,
                                  recipe=recipe, seed=m.seed, low_res=low_res, input_size=size,
                                  weight=m.weight, resources=resources, packing=packing))
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"member names must be unique; repeated: {', '.join(dupes)}")
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
