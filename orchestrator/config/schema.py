"""The config's schema: typed sections of an ensemble config, unknown keys refused.

    recipes: {name: Recipe}                   -- optimiser, LR policy, augmentation, epochs
    defaults / members: Member                -- arch, recipe, seed, input size, Resources
    data, storage, mlflow, ray, packing       -- where things live and how they run

Names are checked against their registries here (LR policies, augmentation presets) so
a wrong one is refused at load time with the valid choices. `ResolvedMember` is one
member made whole by `orchestrator/config/load.py`. The search section's schema is in
`orchestrator/config/search.py`, distillation's in `orchestrator/config/distill.py`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.base.errors import UserError
from orchestrator.config.distill import Distill
from orchestrator.config.strict import Strict
from orchestrator.train import augment, lr


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
    distill: Distill | None = None  # learn from an ensemble's softened predictions (Hinton et al. 2015)
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
    # a number, or auto: orchestrator/planning/packing.py decides how many members share a GPU
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
        trains the member itself (one worker, orchestrator/runtime/in_trial.py); a token share
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
    # train (less its minival) dealt into K disjoint per-class shares; member i trains on
    # share i mod K (orchestrator/data/shares.py)
    shares: int | None = Field(None, ge=2, description="disjoint shares of train, one per member in turn")
    # train decoded once and held where the model trains (orchestrator/data/resident.py):
    # auto = when its images share one size, the augmentations have a batch form and it fits
    resident: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _minival_fits(self):
        if self.minival and self.train_per_class and self.minival >= self.train_per_class:
            raise UserError(f"data.minival ({self.minival} per class) must be below data.train_per_class "
                            f"({self.train_per_class}): the rest of train is what the members learn from")
        if self.shares and self.train_per_class and self.train_per_class - (self.minival or 0) < self.shares:
            raise UserError(f"data.shares ({self.shares}) leaves an empty share: data.train_per_class "
                            f"({self.train_per_class}) less data.minival ({self.minival or 0}) must be at least "
                            f"the number of shares")
        return self

    def member_per_class(self, read: float) -> float:
        """Of `read` train images of a class, those one member trains on: less the minival,
        and with shares, one share of the rest."""
        return max(0, read - (self.minival or 0)) / (self.shares or 1)

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
        if self.shares is None:
            d.pop("shares")
        return d


class Storage(Strict):
    path: str = "./outputs"  # checkpoints, predictions, member records: local or s3://
    create_bucket: bool = False  # an s3:// bucket missing at the start is created (else refused)


class Mlflow(Strict):
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else an embedded SQLite store
    experiment: str = "ensembles"


class RayOpts(Strict):
    address: str | None = None  # else RAY_ADDRESS / the running cluster / a local instance
    max_concurrent_members: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0, description="Ray Train restarts of a member's worker group")


# K trainers' total images/s over one trainer's on one GPU: ResNet-18 at 32 px on an H200
# (../shared/docs/BACKGROUND.md); bench/pack_bench.py --out measures a cluster's own
H200_PACKING_GAINS = {1: 1.0, 2: 2.32, 4: 3.5, 8: 3.44}


class PackingOpts(Strict):
    """What `gpus_per_worker: auto` is decided from (orchestrator/planning/packing.py)."""

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
    share: int | None = None  # with data.shares: the share of train it trains on
    role: str | None = None  # "student of <ensemble>", "twin of <student>": left out of the ensemble
