"""LR policies are pure functions of the step, checked at their endpoints."""
import math

import pytest

from orchestrator.errors import UserError
from orchestrator.train import lr

TOTAL = 1000
# policy -> (multiplier at step 0, multiplier at the last step)
ENDPOINTS = {
    "constant": (1.0, 1.0),
    "step": (1.0, 0.001),  # /10 at 30%, 60%, 90% of training
    "multistep": (1.0, 0.01),
    "exponential": (1.0, 0.01),
    "poly": (1.0, 0.0),
    "cosine": (1.0, 0.0),
    "cosine_restarts": (1.0, 0.0),
    "onecycle": (0.04, 1e-4),
    "triangular": (0.1, 0.1),
}


def test_every_policy_has_endpoints_checked():
    assert set(ENDPOINTS) == set(lr.list_policies())


@pytest.mark.parametrize("policy", sorted(ENDPOINTS))
def test_endpoints(policy):
    first, last = ENDPOINTS[policy]
    assert lr.multiplier(policy, 0, TOTAL) == pytest.approx(first, abs=1e-6)
    assert lr.multiplier(policy, TOTAL, TOTAL) == pytest.approx(last, abs=1e-3)
    values = [lr.multiplier(policy, s, TOTAL) for s in range(TOTAL)]
    assert all(0 <= v <= 1 + 1e-9 for v in values)
    assert values == [lr.multiplier(policy, s, TOTAL) for s in range(TOTAL)]  # pure: same step, same value


@pytest.mark.parametrize("policy", sorted(ENDPOINTS))
def test_linear_warmup_in_front_of_every_policy(policy):
    warm = 100
    ramp = [lr.multiplier(policy, s, TOTAL, warmup_steps=warm) for s in range(warm)]
    assert ramp[0] == pytest.approx(1 / warm) and ramp[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    first = ENDPOINTS[policy][0]
    assert lr.multiplier(policy, warm, TOTAL, warmup_steps=warm) == pytest.approx(first, abs=1e-6)


def test_shapes_between_the_endpoints():
    assert lr.multiplier("cosine", 500, 1000) == pytest.approx(0.5)
    assert lr.multiplier("multistep", 499, 1000) == 1.0 and lr.multiplier("multistep", 500, 1000) == pytest.approx(0.1)
    assert lr.multiplier("onecycle", 300, 1000) == pytest.approx(1.0)
    assert lr.multiplier("poly", 500, 1000, power=1.0) == pytest.approx(0.5)
    # SGDR restarts: back at the peak at the start of every cycle
    assert lr.multiplier("cosine_restarts", 334, 1000, cycles=3) > 0.99
    assert lr.multiplier("triangular", 250, 1000, cycles=2) == pytest.approx(1.0)
    assert math.isclose(lr.multiplier("exponential", 500, 1000, final=0.01), 0.1)


def test_linear_scaling_rule():
    assert lr.scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert lr.scaled_lr(0.1, 1024) == pytest.approx(0.4)


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown LR policy 'linear'.*cosine.*onecycle"):
        lr.multiplier("linear", 0, 10)
