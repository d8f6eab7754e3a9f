"""Faults injected for real on the local stack (processes killed by pid, servers stopped):
each must cost minutes, never finished work or data. The figures these tests print are
the "Reliability" table of docs/reliability.md (`pytest -s tests/test_faults.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT, run_cli
from tests.test_e2e import RUNTIME_EXCLUDES, check_runs_file, children_of, s3_data  # noqa: F401

DRILL = "configs/fault-drill.yaml"
# the Ray actor class a single-worker member trains in: its Tune trial (a function trainable)
TRAINING_PROCESS = "ImplicitFunc"
# a short outage: far inside both retry budgets (MLflow ~4 min, storage 5 min), long enough
# that a member's next log call or checkpoint upload meets it
OUTAGE_S = 15


def jobs(stack):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack["dashboard"])


def start(stack, env: dict, config: str = DRILL) -> str:
    job = f"drill-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ray", "job", "submit", "--address", stack["dashboard"], "--working-dir", ".", "--no-wait",
                    "--submission-id", job, "--runtime-env-json",
                    json.dumps({"env_vars": env, "excludes": RUNTIME_EXCLUDES}), "--", "python",
                    "jobs/train_ensemble.py", "--config", config, "--runs", f"{env['ENSEMBLE_STORAGE']}/runs.yaml"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return job


def wait(stack, job: str, timeout: float = 900) -> tuple[str, str]:
    client, deadline = jobs(stack), time.time() + timeout
    while (status := str(client.get_job_status(job)).split(".")[-1]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {job} still {status} after {timeout} s"
        time.sleep(1)
    return status, client.get_job_logs(job)


def drill_env(stack, s3_data, tag: str) -> dict:
    run = uuid.uuid4().hex[:8]
    return {"DATA_ROOT": s3_data, "ENSEMBLE_STORAGE": f"s3://{stack['bucket']}/{tag}-{run}",
            "MLFLOW_EXPERIMENT": f"{tag}-{run}"}


def epochs_logged(stack, experiment: str) -> int:
    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], "tags.`member.key` != ''")
    return max((len(client.get_metric_history(r.info.run_id, "val_top1_err")) for r in runs), default=0)


def wait_for_epoch(stack, experiment: str, epoch: int, job: str, timeout: float = 600) -> None:
    """Until a member of `experiment` has logged `epoch`; a job that ended first fails at once."""
    deadline = time.time() + timeout
    while epochs_logged(stack, experiment) < epoch:
        assert time.time() < deadline, f"epoch {epoch} not logged within {timeout} s"
        status = str(jobs(stack).get_job_status(job)).split(".")[-1]
        assert status not in ("FAILED", "STOPPED"), jobs(stack).get_job_logs(job)[-3000:]
        time.sleep(0.5)


def final_member(stack, env) -> tuple[dict, list]:
    runs = load_runs(f"{env['ENSEMBLE_STORAGE']}/runs.yaml")
    check_runs_file(runs, 1, 10)
    client = MlflowClient(stack["mlflow"])
    parent = client.get_run(runs.mlflow.parent_run_id)
    children = children_of(client, parent)
    assert len(children) == 1  # the member continued as the same MLflow run
    history = client.get_metric_history(children[0].info.run_id, "val_top1_err")
    assert sorted({h.step for h in history}) == [1, 2, 3]
    return runs.members[0].metrics, history


@pytest.fixture(scope="module")
def undisturbed(stack, s3_data):  # noqa: F811
    env = drill_env(stack, s3_data, "calm")
    begin = time.time()
    status, logs = wait(stack, start(stack, env))
    assert status == "SUCCEEDED", logs[-3000:]
    metrics, _ = final_member(stack, env)
    return {"metrics": metrics, "seconds": time.time() - begin}


def outage(service: str, seconds: float) -> None:
    """The stack's `service` (s3 or mlflow) stopped by its pid for `seconds`, then restarted;
    the job under test keeps running meanwhile."""
    subprocess.run(["bash", "infra/local/down.sh", service], cwd=ROOT, check=True, capture_output=True)
    try:
        time.sleep(seconds)
    finally:
        subprocess.run(["bash", "infra/local/up.sh", service], cwd=ROOT, check=True, capture_output=True)


def report(name: str, seconds: float, base: float, redone: str) -> None:
    print(f"\nRELIABILITY | {name} | {seconds - base:+.0f} s over an undisturbed run ({base:.0f} s) | "
          f"redone: {redone} | data lost: none")


@pytest.mark.stack
def test_a_killed_training_process_resumes_from_its_last_checkpoint(stack, s3_data, undisturbed):  # noqa: F811
    from ray.util.state import list_actors

    env = drill_env(stack, s3_data, "kill-worker")
    begin = time.time()
    job = start(stack, env)
    wait_for_epoch(stack, env["MLFLOW_EXPERIMENT"], 1, job)
    time.sleep(2)  # into epoch 2
    ray_job = jobs(stack).get_job_info(job).job_id
    workers = [a for a in list_actors(filters=[("class_name", "=", TRAINING_PROCESS), ("state", "=", "ALIVE")])
               if a.job_id == ray_job]
    assert workers, "no training process of the job is alive"
    os.kill(workers[0].pid, 9)
    status, logs = wait(stack, job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resuming after epoch 1" in logs or "resuming after epoch 2" in logs  # at most one epoch redone
    # the terminal gets one line naming the cause; Tune's traceback is in the job's log file
    restart = [line for line in logs.splitlines() if "restarted (" in line]
    # ... a file in the job's storage (the driver's own folder is Ray's temporary copy)
    where = f"traceback in {env['ENSEMBLE_STORAGE']}/fault-drill/logs/"
    assert len(restart) == 1 and where in restart[0], logs[-3000:]
    import s3fs

    log_uri = restart[0].split("traceback in ", 1)[1].rstrip(")")
    assert "Traceback (most recent call last)" in s3fs.S3FileSystem().cat_file(log_uri).decode()
    assert "Trial task failed" not in logs, logs[-3000:]
    metrics, _ = final_member(stack, env)
    # the same seed, restarted once: the same model within noise (80 val images)
    assert abs(metrics["top1_err"] - undisturbed["metrics"]["top1_err"]) <= 0.15
    report("a member's training process killed (SIGKILL) mid-epoch", time.time() - begin, undisturbed["seconds"],
           "the interrupted epoch")


@pytest.mark.stack
def test_the_mlflow_server_stopped_for_15_s(stack, s3_data, undisturbed):  # noqa: F811
    # MLflow's client waits 1, 2, 4, ... s between retries (its factor is a whole number; about
    # 2 minutes in all, well past the outage), not 2, 4, 8, ...: the member's next call lands
    # sooner after the server is back
    env = {**drill_env(stack, s3_data, "mlflow-down"), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    begin = time.time()
    job = start(stack, env)
    wait_for_epoch(stack, env["MLFLOW_EXPERIMENT"], 1, job)
    outage("mlflow", OUTAGE_S)
    status, logs = wait(stack, job)
    assert status == "SUCCEEDED", logs[-3000:]
    metrics, history = final_member(stack, env)  # every epoch's metrics arrived, once the server was back
    assert "resuming after epoch" not in logs  # training waited for the server; nothing was redone
    assert abs(metrics["top1_err"] - undisturbed["metrics"]["top1_err"]) <= 0.15
    report(f"the MLflow server stopped for {OUTAGE_S} s", time.time() - begin, undisturbed["seconds"], "nothing")


@pytest.mark.stack
def test_the_s3_server_stopped_for_15_s(stack, s3_data, undisturbed):  # noqa: F811
    env = drill_env(stack, s3_data, "s3-down")
    begin = time.time()
    job = start(stack, env)
    wait_for_epoch(stack, env["MLFLOW_EXPERIMENT"], 1, job)
    outage("s3", OUTAGE_S)
    status, logs = wait(stack, job)
    assert status == "SUCCEEDED", logs[-3000:]
    metrics, _ = final_member(stack, env)  # checkpoint and predictions named in runs.yaml load from S3
    client = MlflowClient(stack["mlflow"])
    runs = load_runs(f"{env['ENSEMBLE_STORAGE']}/runs.yaml")
    child = runs.members[0].mlflow_run_id
    local = client.download_artifacts(child, "predictions/predictions.npy")
    import numpy as np

    assert np.load(local).shape == (80, 10)  # the artifact logged through the MLflow server arrived too
    assert abs(metrics["top1_err"] - undisturbed["metrics"]["top1_err"]) <= 0.15
    report(f"the S3 server stopped for {OUTAGE_S} s", time.time() - begin, undisturbed["seconds"],
           "at most the epoch whose checkpoint upload failed")


def test_a_diverging_member_fails_alone_and_evaluation_skips_it(tmp_path, tiny_root):
    cfg = yaml.safe_load((ROOT / DRILL).read_text().replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200",
                                                             tiny_root))
    cfg["storage"] = {"path": str(tmp_path / "out")}
    cfg["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "nan"}
    cfg["ray"] = {"max_failures": 0}
    cfg["recipes"]["tiny"]["epochs"] = 2
    cfg["recipes"]["boom"] = {**cfg["recipes"]["tiny"], "optimizer": {"name": "sgd", "lr": 1.0e+8}}
    cfg["defaults"]["resources"]["cpus_per_worker"] = 0.75
    cfg["members"].append({"name": "diverges", "arch": "vgg11_bn", "recipe": "boom", "seed": 1})
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli("jobs/train_ensemble.py", "--config", str(tmp_path / "nan.yaml"), "--runs",
                  str(tmp_path / "runs.yaml"), env={"RAY_ADDRESS": "local"}, timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    runs = load_runs(str(tmp_path / "runs.yaml"))
    status = {m.name: m for m in runs.members}
    assert status["resnet18-drill"].status == "finished"
    assert status["diverges"].status == "failed" and "NonFiniteLoss" in status["diverges"].error
    assert status["diverges"].checkpoint is None  # no garbage checkpoint handed on
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    child = client.get_run(status["diverges"].mlflow_run_id)
    assert child.info.status == "FAILED" and "loss is" in child.data.tags["failure"]
    ev = run_cli("-m", "ensemble.evaluate", "--members", str(tmp_path / "runs.yaml"), "--out",
                 str(tmp_path / "report"), "--no-mlflow")
    assert ev.returncode == 0 and "skipping member diverges" in ev.stderr


@pytest.mark.stack
def test_the_local_stack_listens_on_loopback_only(stack):
    import psutil

    ports = {int(os.environ.get(k, d)) for k, d in (("S3_PORT", 8333), ("MLFLOW_PORT", 5055), ("RAY_PORT", 6390),
                                                      ("RAY_DASHBOARD_PORT", 8265))}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port in ports}
    assert {port for _, port in listening} == ports
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.mark.stack
def test_the_mlflow_server_down_past_its_retry_budget_ends_the_job_in_one_line(stack, s3_data):  # noqa: F811
    """A tracking server that does not come back: the job ends with one line naming it, its
    retry budget (a short one here) and what was kept, exit 1; the traceback is in a file."""
    env = {**drill_env(stack, s3_data, "mlflow-gone"), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MAX_FAILURES": "0"}
    job = start(stack, env)
    wait_for_epoch(stack, env["MLFLOW_EXPERIMENT"], 1, job)
    subprocess.run(["bash", "infra/local/down.sh", "mlflow"], cwd=ROOT, check=True, capture_output=True)
    try:
        status, logs = wait(stack, job, timeout=300)
    finally:
        subprocess.run(["bash", "infra/local/up.sh", "mlflow"], cwd=ROOT, check=True, capture_output=True)
    assert status == "FAILED", logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs[-3000:]
    assert errors[0].startswith(f"error: the MLflow tracking server at {stack['mlflow']} stayed down past its retry "
                                f"budget, about 1 s (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
                                f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); stopped. Kept: ")
    log = errors[0].rsplit("Traceback: ", 1)[1]
    assert os.path.exists(log) and "MlflowException" in open(log).read()
    assert logs.strip().splitlines()[-1] == errors[0]  # the job's last word, not a traceback


@pytest.mark.stack
def test_the_s3_server_down_past_its_retry_budget_ends_the_job_in_one_line(stack, s3_data):  # noqa: F811
    """An object store that does not come back: the job ends with one line naming it, its
    retry budget (STORAGE_RETRY_SECONDS, short here) and what was kept, exit 1; the
    traceback is in a file."""
    env = {**drill_env(stack, s3_data, "s3-gone"), "STORAGE_RETRY_SECONDS": "3", "MAX_FAILURES": "0"}
    job = start(stack, env)
    wait_for_epoch(stack, env["MLFLOW_EXPERIMENT"], 1, job)
    subprocess.run(["bash", "infra/local/down.sh", "s3"], cwd=ROOT, check=True, capture_output=True)
    try:
        status, logs = wait(stack, job, timeout=300)
    finally:
        subprocess.run(["bash", "infra/local/up.sh", "s3"], cwd=ROOT, check=True, capture_output=True)
    assert status == "FAILED", logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs[-3000:]
    assert errors[0].startswith(f"error: the object store at {stack['s3_endpoint']} stayed down past its "
                                f"retry budget, 3 s (STORAGE_RETRY_SECONDS); stopped. Kept: "), errors[0]
    log = errors[0].rsplit("Traceback: ", 1)[1]
    assert os.path.exists(log) and "Traceback" in open(log).read()
    assert logs.strip().splitlines()[-1] == errors[0]  # the job's last word, not a traceback


@pytest.mark.stack
def test_a_tracking_server_down_at_the_start_is_one_line_and_exit_2(stack, tmp_path, tiny_root):
    from pathlib import Path

    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "ENSEMBLE_STORAGE": str(tmp_path / "store"),
           "DATA_ROOT": str(Path(tiny_root).parent)}
    out = run_cli("jobs/train_ensemble.py", "--config", DRILL, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: the MLflow tracking server at http://127.0.0.1:9 does not answer (connection refused); start it, or "
        "point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a running one"]
    assert not (tmp_path / "store").exists()  # nothing started
    runs = tmp_path / "runs.yaml"
    runs.write_text(yaml.safe_dump({"version": 1, "ensemble": "e", "members": [], "mlflow": {
        "tracking_uri": "http://127.0.0.1:9", "experiment": "e", "parent_run_id": "p"},
        "dataset": {"name": "t", "uri": str(tmp_path), "split": "val", "num_classes": 2, "labels": "l.npy"}}))
    out = run_cli("-m", "ensemble.evaluate", "--members", str(runs), env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: the MLflow tracking server at "
                                                                 "http://127.0.0.1:9 does not answer")
