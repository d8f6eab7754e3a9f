"""Member concurrency on hand-made cluster shapes: never starve, never over-ask."""
import pytest

from orchestrator.config import parse_config, resolve_members
from orchestrator.base.errors import UserError
from orchestrator.runtime.launch import plan_concurrency


def members(*resources):
    cfg = parse_config({"name": "p", "data": {"root": "/d"}, "recipes": {"default": {}},
                        "members": [{"arch": "resnet18", "name": f"m{i}", "resources": r}
                                    for i, r in enumerate(resources)]})
    return resolve_members(cfg)


def test_two_single_worker_members_share_two_cpus():
    ms = members({"cpus_per_worker": 0.75}, {"cpus_per_worker": 0.75})
    assert plan_concurrency(ms, {"CPU": 2}, None) == 2


def test_a_data_parallel_member_does_not_serialise_the_small_ones():
    ms = members(*[{"cpus_per_worker": 0.75}] * 5, {"workers": 2, "cpus_per_worker": 0.75})
    # 2 trials x 0.25 + the 1.5-CPU group = 2 CPUs: still guaranteed to progress
    assert plan_concurrency(ms, {"CPU": 2}, None) == 2


def test_gpu_packing_and_the_cap():
    quarter = {"use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 3}
    ms = members(*[quarter] * 12)
    assert plan_concurrency(ms, {"CPU": 64, "GPU": 2}, None) == 8  # 4 per GPU on 2 GPUs
    assert plan_concurrency(ms, {"CPU": 64, "GPU": 2}, 3) == 3
    assert plan_concurrency(ms, {"CPU": 8, "GPU": 2}, None) == 2  # CPUs bound first: 2 x 3


def test_impossible_requests_are_refused_with_one_line():
    with pytest.raises(UserError, match="member m0 needs 4 GPU but the cluster has 1"):
        plan_concurrency(members({"workers": 4, "use_gpu": True, "gpus_per_worker": 1}), {"CPU": 32, "GPU": 1}, None)
    with pytest.raises(UserError, match="member m0 needs 4.25 CPU but the cluster has 2"):
        plan_concurrency(members({"workers": 4, "cpus_per_worker": 1}), {"CPU": 2}, None)
    with pytest.raises(UserError, match="needs 1 GPU but the cluster has 0"):
        plan_concurrency(members({"use_gpu": True}), {"CPU": 2}, None)


def test_single_worker_members_hold_only_their_own_cpus():
    # their trial process trains them: no 0.25-CPU trial on top, so two 1-CPU members fit 2 CPUs
    ms = members({"cpus_per_worker": 1.0}, {"cpus_per_worker": 1.0})
    assert plan_concurrency(ms, {"CPU": 2}, None) == 2
    # a data-parallel member's trial still waits beside its worker group
    ms = members({"workers": 2, "cpus_per_worker": 1.0}, {"cpus_per_worker": 1.0})
    with pytest.raises(UserError, match="member m0 needs 2.25 CPU but the cluster has 2"):
        plan_concurrency(ms, {"CPU": 2}, None)
