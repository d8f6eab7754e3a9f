"""Learning-rate policies as pure functions of the iteration.

Each policy maps (step, total_steps, **hparams) -> multiplier of the peak LR, with no
hidden state (nanoGPT's `get_lr`, timm's step-explicit schedulers), so a policy can be
plotted, unit-tested at its endpoints and resumed at any step. `multiplier()` adds the
optional linear warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD") in front of
any policy. The peak LR itself is given per 256 images and scaled in one place:
`scaled_lr` (the linear scaling rule of the same paper).
"""
from __future__ import annotations

import math
from typing import Callable

from orchestrator.errors import unknown_name

Policy = Callable[..., float]
_POLICIES: dict[str, Policy] = {}


def _policy(fn: Policy) -> Policy:
    _POLICIES[fn.__name__.removeprefix("_")] = fn
    return fn


@_policy
def _constant(t: float) -> float:
    return 1.0


@_policy
def _step(t: float, step_size: float = 0.3, gamma: float = 0.1) -> float:
    """Multiply by gamma every `step_size` of training (AlexNet: /10 three times in ~90 epochs)."""
    return gamma ** math.floor(t / step_size)


@_policy
def _multistep(t: float, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """/10 at fixed fractions of training (ResNet: epochs 30, 60 of 90)."""
    return gamma ** sum(t >= m for m in milestones)


@_policy
def _exponential(t: float, final: float = 0.01) -> float:
    """Smooth geometric decay reaching `final` at the end (Inception-v3: 0.94 per 2 epochs)."""
    return final**t


@_policy
def _poly(t: float, power: float = 2.0) -> float:
    """(1 - t)^power (GoogLeNet's 'poly' policy in Caffe; power 0.5 in the BN-Inception)."""
    return (1.0 - t) ** power


@_policy
def _cosine(t: float, final: float = 0.0) -> float:
    """Half cosine from 1 to `final` (Loshchilov & Hutter 2017, SGDR without restarts)."""
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


@_policy
def _cosine_restarts(t: float, cycles: int = 3, cycle_mult: float = 1.0, final: float = 0.0) -> float:
    """SGDR: cosine cycles restarting at the peak; cycle i lasts cycle_mult^i units."""
    lengths = [cycle_mult**i for i in range(int(cycles))]
    pos = t * sum(lengths)
    for length in lengths:
        if pos < length or length is lengths[-1]:
            return _cosine(min(pos / length, 1.0), final)
        pos -= length
    return final


@_policy
def _onecycle(t: float, peak_at: float = 0.3, start: float = 0.04, final: float = 1e-4) -> float:
    """One-cycle (Smith & Topin 2018): linear up to the peak at `peak_at`, then cosine down."""
    if t < peak_at:
        return start + (1 - start) * t / peak_at
    return _cosine((t - peak_at) / (1 - peak_at), final)


@_policy
def _triangular(t: float, cycles: int = 2, low: float = 0.1) -> float:
    """Cyclical LR (Smith 2017): triangle waves between `low` and 1."""
    phase = (t * cycles) % 1.0
    return low + (1 - low) * (1 - abs(2 * phase - 1))


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def get_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]
    except KeyError:
        raise unknown_name("LR policy", name, _POLICIES) from None


def multiplier(policy: str, step: int, total_steps: int, warmup_steps: int = 0, **hparams) -> float:
    """LR multiplier at `step` of `total_steps`: linear warm-up from ~0, then the policy
    over the remaining steps with t in [0, 1]."""
    fn = get_policy(policy)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return fn(t, **hparams)


def scaled_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule: the config states LR per 256 images (Goyal et al. 2017)."""
    return lr_per_256 * global_batch / 256
