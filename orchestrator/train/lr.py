"""Learning-rate policies as pure functions of the iteration.

Each policy maps (t in [0, 1], its typed parameters) -> multiplier of the peak LR, with no
hidden state (nanoGPT's `get_lr`, timm's step-explicit schedulers), so a policy can be
plotted, unit-tested at its endpoints and resumed at any step. A policy's parameters are
a pydantic model: a misspelt or out-of-range parameter is refused when the config loads.

`schedule()` adds the optional linear warm-up (Goyal et al. 2017, "Accurate, Large
Minibatch SGD") in front of any policy. The warm-up rises from ~0 to the policy's own
starting value `fn(0)`, not to 1, so it joins the policy without a jump (one-cycle starts
at 0.04 and triangular at its `low`: a warm-up to 1.0 would drop them 25x and 10x in one
step). The peak LR itself is given per 256 images and scaled in one place: `scaled_lr`
(the linear scaling rule of the same paper).
"""
from __future__ import annotations

import math
from typing import Callable

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.base.errors import UserError, did_you_mean, unknown_name


class Params(BaseModel):
    """Parameters of a policy; unknown ones are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_POLICIES: dict[str, tuple[Callable[[float, Params], float], type[Params]]] = {}


def _policy(params: type[Params]):
    def register(fn):
        _POLICIES[fn.__name__.removeprefix("_")] = (fn, params)
        return fn
    return register


class NoParams(Params):
    pass


class StepParams(Params):
    # a fraction of training, not a number of steps; `step_size` is its former name
    every: float = Field(0.3, gt=0, le=1, validation_alias=AliasChoices("every", "step_size"),
                         description="fraction of training between drops")
    gamma: float = Field(0.1, gt=0, le=1)


class MultistepParams(Params):
    milestones: tuple[float, ...] = Field((0.5, 0.75), description="fractions of training where the LR drops")
    gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v):
        if any(not 0 < m < 1 for m in v) or list(v) != sorted(v):
            raise ValueError("milestones are increasing fractions of training in (0, 1)")
        return v


class FinalParams(Params):
    final: float = Field(0.0, ge=0, le=1, description="multiplier at the end of training")


class ExponentialParams(Params):
    final: float = Field(0.01, gt=0, le=1, description="multiplier at the end of training")


class PolyParams(Params):
    power: float = Field(2.0, gt=0)


class RestartParams(Params):
    cycles: int = Field(3, ge=1)
    cycle_mult: float = Field(1.0, gt=0, description="each cycle lasts this many times the previous one")
    final: float = Field(0.0, ge=0, le=1)


class OnecycleParams(Params):
    peak_at: float = Field(0.3, gt=0, lt=1)
    start: float = Field(0.04, gt=0, le=1)
    final: float = Field(1e-4, ge=0, le=1)


class TriangularParams(Params):
    cycles: int = Field(2, ge=1)
    low: float = Field(0.1, ge=0, le=1)


@_policy(NoParams)
def _constant(t: float, p: NoParams) -> float:
    return 1.0


@_policy(StepParams)
def _step(t: float, p: StepParams) -> float:
    """Multiply by gamma every `every` of training (AlexNet: /10 three times in ~90 epochs)."""
    return p.gamma ** math.floor(t / p.every)


@_policy(MultistepParams)
def _multistep(t: float, p: MultistepParams) -> float:
    """/10 at fixed fractions of training (ResNet: epochs 30, 60 of 90)."""
    return p.gamma ** sum(t >= m for m in p.milestones)


@_policy(ExponentialParams)
def _exponential(t: float, p: ExponentialParams) -> float:
    """Smooth geometric decay reaching `final` at the end (Inception-v3: 0.94 per 2 epochs)."""
    return p.final**t


@_policy(PolyParams)
def _poly(t: float, p: PolyParams) -> float:
    """(1 - t)^power (GoogLeNet's 'poly' policy in Caffe; power 0.5 in the BN-Inception)."""
    return (1.0 - t) ** p.power


def _half_cosine(t: float, final: float) -> float:
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


@_policy(FinalParams)
def _cosine(t: float, p: FinalParams) -> float:
    """Half cosine from 1 to `final` (Loshchilov & Hutter 2017, SGDR without restarts)."""
    return _half_cosine(t, p.final)


@_policy(RestartParams)
def _cosine_restarts(t: float, p: RestartParams) -> float:
    """SGDR: cosine cycles restarting at the peak; cycle i lasts cycle_mult^i units."""
    lengths = [p.cycle_mult**i for i in range(p.cycles)]
    pos = t * sum(lengths)
    for i, length in enumerate(lengths):
        if pos < length or i == len(lengths) - 1:  # by index: equal lengths are not the last one
            return _half_cosine(min(pos / length, 1.0), p.final)
        pos -= length
    return p.final


@_policy(OnecycleParams)
def _onecycle(t: float, p: OnecycleParams) -> float:
    """One-cycle (Smith & Topin 2018): linear up to the peak at `peak_at`, then cosine down."""
    if t < p.peak_at:
        return p.start + (1 - p.start) * t / p.peak_at
    return _half_cosine((t - p.peak_at) / (1 - p.peak_at), p.final)


@_policy(TriangularParams)
def _triangular(t: float, p: TriangularParams) -> float:
    """Cyclical LR (Smith 2017): triangle waves between `low` and 1."""
    phase = (t * p.cycles) % 1.0
    return p.low + (1 - p.low) * (1 - abs(2 * phase - 1))


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def _entry(name: str):
    try:
        return _POLICIES[name]
    except KeyError:
        raise unknown_name("LR policy", name, _POLICIES) from None


def policy_params(name: str) -> list[str]:
    """The parameter names a policy takes (former names, kept as aliases, included)."""
    out = []
    for field_name, info in _entry(name)[1].model_fields.items():
        out.append(field_name)
        if isinstance(info.validation_alias, AliasChoices):
            out += [a for a in info.validation_alias.choices if a != field_name]
    return out


def parse_params(name: str, params: dict) -> Params:
    """The policy's typed parameters; one-line UserError naming the valid ones."""
    model = _entry(name)[1]
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        valid = ", ".join(model.model_fields) or "none"
        if err["type"] == "extra_forbidden":
            raise UserError(f"LR policy {name!r} has no parameter {where!r}{did_you_mean(where, model.model_fields)}; "
                            f"valid params: {valid}") from None
        raise UserError(f"LR policy {name!r} parameter {where!r}: {err['msg']}") from None


def schedule(policy: str, total_steps: int, warmup_steps: int = 0, params: dict | None = None
             ) -> Callable[[int], float]:
    """step -> LR multiplier: linear warm-up from ~0 to the policy's starting value, then
    the policy over the remaining steps with t in [0, 1]. Parameters validated once."""
    fn, _ = _entry(policy)
    p = parse_params(policy, params or {})
    start = fn(0.0, p)
    span = max(total_steps - warmup_steps, 1)

    def at(step: int) -> float:
        if step < warmup_steps:
            return start * (step + 1) / warmup_steps
        return fn(min(max((step - warmup_steps) / span, 0.0), 1.0), p)

    return at


def multiplier(policy: str, step: int, total_steps: int, warmup_steps: int = 0, **params) -> float:
    """LR multiplier at one `step` (see `schedule`)."""
    return schedule(policy, total_steps, warmup_steps, params)(step)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule: the config states LR per 256 images (Goyal et al. 2017)."""
    return lr_per_256 * global_batch / 256
