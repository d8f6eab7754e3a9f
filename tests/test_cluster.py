"""The two-node simulation (infra/local/node.sh): a second Ray node on this machine joins
the local head; members spread over both nodes, and losing one node costs its members a
restart from their checkpoints on the node that is left, never the job."""
from __future__ import annotations

import subprocess
import time

import pytest

from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT
from tests.test_e2e import check_runs_file, s3_data  # noqa: F401
from tests.test_faults import TRAINING_PROCESS, drill_env, jobs, report, start, wait


def node(*args: str) -> str:
    out = subprocess.run(["bash", "infra/local/node.sh", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def worker_nodes(job: str) -> dict[str, str]:
    """{actor id: node id} of the job's alive training processes (single-worker members)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", TRAINING_PROCESS), ("state", "=", "ALIVE")])
    return {a.actor_id: a.node_id for a in actors if a.job_id == job}


@pytest.mark.stack
def test_members_spread_over_two_nodes_and_survive_losing_one(stack, s3_data):  # noqa: F811
    node("up", "2")
    killed = False
    try:
        env = drill_env(stack, s3_data, "two-node")
        begin = time.time()
        job = start(stack, env, config="configs/two-node.yaml")
        ray_job, deadline = None, time.time() + 600
        while True:  # both members training at once, one on each node
            ray_job = ray_job or jobs(stack).get_job_info(job).job_id
            placed = worker_nodes(ray_job) if ray_job else {}
            if len(set(placed.values())) == 2:
                break
            assert time.time() < deadline, f"members never ran on both nodes: {placed}"
            time.sleep(1)
        time.sleep(15)  # let them train a little
        print(node("kill"))
        killed = True
        status, logs = wait(stack, job, timeout=1200)
        assert status == "SUCCEEDED", logs[-4000:]
        runs = load_runs(f"{env['ENSEMBLE_STORAGE']}/runs.yaml")
        check_runs_file(runs, 2, 10)  # both members finished, checkpoints and predictions intact
        assert len(set(worker_nodes(ray_job).values())) == 0  # nothing left running
        report("a worker node lost (all its processes SIGKILLed)", time.time() - begin, 0.0,
               "the lost node's member since its last checkpoint")
    finally:
        if not killed:
            node("kill")
