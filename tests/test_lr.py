"""LR policies are pure functions of the step, checked at their endpoints."""
import math

import pytest

from orchestrator.base.errors import UserError
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
def test_linear_warmup_joins_every_policy_without_a_jump(policy):
    warm = 100
    first = ENDPOINTS[policy][0]
    at = lr.schedule(policy, TOTAL, warmup_steps=warm)
    ramp = [at(s) for s in range(warm)]
    assert ramp[0] == pytest.approx(first / warm) and ramp[-1] == pytest.approx(first)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert at(warm) == pytest.approx(first, abs=1e-6)
    # at the hand-over the multiplier never falls by more than one step's worth of either side
    one_step = max(first / warm, abs(at(warm + 1) - at(warm)))
    assert at(warm - 1) - at(warm) <= one_step + 1e-9


def test_cosine_restarts_with_equal_integer_cycles_restarts_every_cycle():
    # `cycle_mult: 1` read from YAML is an int; the old identity test left the LR at 0
    # for the last two cycles
    values = [lr.multiplier("cosine_restarts", s, 900, cycles=3, cycle_mult=1) for s in range(900)]
    assert values[300] > 0.99 and values[600] > 0.99
    assert values[450] == pytest.approx(0.5, abs=0.02) and values[750] == pytest.approx(0.5, abs=0.02)
    assert min(values[300:]) < 0.01 and sum(v > 0.5 for v in values[600:]) > 100


@pytest.mark.parametrize("policy,params,match", [
    ("cosine", {"finall": 0.1}, r"no parameter 'finall' \(did you mean 'final'\?\); valid params: final"),
    ("step", {"gamma": 2.0}, "'gamma'.*less than or equal to 1"),
    ("multistep", {"milestones": [0.8, 0.2]}, "increasing fractions"),
    ("cosine_restarts", {"cycles": 0}, "'cycles'.*greater than or equal to 1"),
])
def test_policy_parameters_are_typed(policy, params, match):
    with pytest.raises(UserError, match=match):
        lr.parse_params(policy, params)


def test_step_size_is_an_alias_of_every():
    assert lr.multiplier("step", 500, 1000, step_size=0.5) == lr.multiplier("step", 500, 1000, every=0.5) == 0.1
    assert "step_size" in lr.policy_params("step")


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
