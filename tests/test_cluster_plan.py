"""`python -m orchestrator.planning.plan` on hand-made cluster shapes, with throughputs given so the
expected schedule can be worked out by hand."""
from __future__ import annotations

import pytest
import yaml

from orchestrator.config import parse_config, resolve_members
from orchestrator.base.errors import UserError
from orchestrator.planning.cluster import Cluster, member_rates, packing_share, plan
from tests.conftest import run_cli

SAMPLES = 36_000  # images per epoch; at 10 images/s one epoch is one hour


def members(n: int, epochs: int = 1, **resources):
    raw = {"name": "p", "data": {"root": "/data"}, "recipes": {"r": {"epochs": epochs}},
           "defaults": {"arch": "resnet18", "recipe": "r", "resources": {"use_gpu": True, **resources}},
           "members": [{"name": f"m{i}", "seed": i} for i in range(n)]}
    return resolve_members(parse_config(raw))


def cluster(*nodes, **extra) -> Cluster:
    return Cluster.model_validate({"name": "c", "nodes": list(nodes), "throughput": {"resnet18": 10.0}, **extra})


def run(ms, c: Cluster) -> dict:
    return plan(ms, SAMPLES, c, member_rates(ms, c, 10, {}))


def test_four_one_gpu_members_on_two_gpus_run_in_two_waves():
    out = run(members(4), cluster({"name": "g", "count": 1, "cpus": 8, "gpus": 2}))
    assert out["wall_hours"] == pytest.approx(2.0) and out["gpu_hours"] == pytest.approx(4.0)
    assert sorted(r["start_h"] for r in out["rows"]) == pytest.approx([0, 0, 1, 1])
    assert out["gpu_utilisation"] == pytest.approx(1.0)


def test_quarter_gpu_members_pack_four_to_a_gpu():
    out = run(members(4, gpus_per_worker=0.25), cluster({"name": "g", "count": 1, "cpus": 8, "gpus": 1}))
    assert [r["start_h"] for r in out["rows"]] == [0, 0, 0, 0] and out["wall_hours"] == pytest.approx(1.0)
    assert packing_share(0.25) == pytest.approx(3.5 / 4)  # the H200 packing measurement


def test_a_data_parallel_member_spreads_over_nodes_when_no_node_holds_it():
    ms = members(1, workers=4)
    out = run(ms, cluster({"name": "g", "count": 2, "cpus": 8, "gpus": 2}))
    assert out["rows"][0]["nodes"] == ["g-0", "g-1"] and out["gpu_hours"] == pytest.approx(4.0)
    with pytest.raises(UserError, match="member m0 needs 4 x .* more than cluster c has"):
        run(ms, cluster({"name": "g", "count": 1, "cpus": 8, "gpus": 2}))


def test_cpus_can_be_the_bottleneck():
    # two GPUs but only enough CPUs for one 4-CPU worker (+ its trial) at a time
    out = run(members(2, cpus_per_worker=4), cluster({"name": "g", "count": 1, "cpus": 5, "gpus": 2}))
    assert out["wall_hours"] == pytest.approx(2.0)


def test_measured_rates_replace_estimates_and_cost_is_gpu_hours_times_price():
    ms = members(2, epochs=2)
    c = cluster({"name": "g", "count": 1, "cpus": 8, "gpus": 2, "gpu_hour_price": 3.0})
    out = plan(ms, SAMPLES, c, member_rates(ms, c, 10, {"m0": 20.0}))
    ends = {r["member"]: r["end_h"] for r in out["rows"]}
    assert ends == pytest.approx({"m0": 1.0, "m1": 2.0})
    assert out["cost"] == pytest.approx(3.0 * (1.0 + 2.0))


def test_the_cli_plans_the_shipped_config_and_refuses_an_impossible_one(tmp_path, tiny_root):
    out = run_cli("-m", "orchestrator.planning.plan", "--config", "configs/smoke.yaml", "--cluster",
                  "infra/clusters/local-2cpu.yaml")
    assert out.returncode == 0, out.stderr
    assert "wall time" in out.stdout and "resnet18-tiny-s0" in out.stdout
    raw = yaml.safe_load(open("configs/smoke.yaml").read().replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200",
                                                                    tiny_root))
    raw["defaults"]["resources"] = {"workers": 1, "use_gpu": True}
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(raw))
    bad = run_cli("-m", "orchestrator.planning.plan", "--config", str(tmp_path / "gpu.yaml"), "--cluster",
                  "infra/clusters/local-2cpu.yaml")
    assert bad.returncode == 2 and "more than cluster local-2cpu has" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


# one H200's measured training rates (images/s) the estimate is fitted to
H200 = {("resnet18", 224, 256): 13_283, ("resnet50", 224, 256): 4_726, ("vgg16_bn", 224, 128): 3_533,
        ("inception_v3", 299, 128): 2_293}


def estimate(arch: str, size: int, batch: int) -> float:
    from orchestrator.planning.cluster import estimated_rate

    raw = {"name": "p", "data": {"root": "/data"}, "recipes": {"r": {"batch_size": batch}},
           "members": [{"arch": arch, "recipe": "r", "input_size": size, "resources": {"use_gpu": True}}]}
    one_gpu = cluster({"name": "g", "count": 1, "cpus": 8, "gpus": 1})
    return estimated_rate(resolve_members(parse_config(raw))[0], one_gpu, 1000)


@pytest.mark.parametrize("arch,size,batch", sorted(H200))
def test_estimates_are_within_2x_of_the_h200_measurements(arch, size, batch):
    assert 0.5 < estimate(arch, size, batch) / H200[(arch, size, batch)] < 2.0


def test_no_family_comes_out_faster_than_a_smaller_one():
    r50 = estimate("resnet50", 224, 256)
    assert estimate("inception_resnet_v2", 299, 256) < r50 < estimate("resnet18", 224, 256)
    assert estimate("resnet152", 224, 256) < estimate("resnet101", 224, 256) < r50
    assert estimate("vgg19_bn", 224, 256) < estimate("vgg16_bn", 224, 256) < estimate("vgg11_bn", 224, 256)


def test_costs_are_counted_without_allocating_weights(monkeypatch):
    import torch

    from orchestrator.planning import cluster as planner

    planner.model_cost.cache_clear()
    made = []
    real = torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: made.append(self.weight.device.type) or real(self))
    flops, layers = planner.model_cost("resnet50", False, 224, 1000)
    assert flops == pytest.approx(8.18e9, rel=0.01) and layers > 100
    assert made and set(made) == {"meta"}
