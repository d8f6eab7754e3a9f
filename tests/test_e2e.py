"""End to end, the way users run it.

- the embedded default path: `python jobs/train_ensemble.py` with nothing running
  (a local Ray instance, an embedded MLflow store, a local folder);
- the cluster path on the real local stack: `ray job submit ... -- python
  jobs/train_ensemble.py` against the Ray head, data streamed from S3, checkpoints on
  S3, an MLflow server whose artifacts live on S3; its driver killed and the job
  submitted again, which resumes it (one job, trained once, read by two tests); then a
  further submission, which must train nothing;
- 20+ tiny members from every family through the same path, one data-parallel.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import boto3
import numpy as np
import pytest
import s3fs
import torch
from mlflow.tracking import MlflowClient

from ensemble.core.math import topk_error
from models import get_spec, load_checkpoint
from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT, TINY

RUNTIME_EXCLUDES = [".venv", ".stack", "outputs", "mlruns", ".git", "runs.yaml"]


def readme_submit(stack, storage: str, extra_env: dict) -> list[str]:
    """The documented local-stack `ray job submit` line (docs/clusters.md), as a user copies
    it, with this test's storage and experiment put in its runtime env."""
    import shlex

    text = (ROOT / "docs" / "clusters.md").read_text()
    start = text.index("ray job submit --address $RAY_DASHBOARD_ADDRESS")
    line = text[start:text.index("\n", text.index("-- python", start))].replace("\\\n", " ")
    args = shlex.split(line.replace("$RAY_DASHBOARD_ADDRESS", stack["dashboard"]))
    i = args.index("--runtime-env-json") + 1
    runtime = json.loads(args[i])
    assert runtime["excludes"] == RUNTIME_EXCLUDES and runtime["env_vars"]["DATA_ROOT"] == f"s3://{stack['bucket']}/data"
    readme_storage = runtime["env_vars"]["ENSEMBLE_STORAGE"]
    runtime["env_vars"].update(ENSEMBLE_STORAGE=storage, **extra_env)
    args[i] = json.dumps(runtime)
    return [a.replace(readme_storage, storage) for a in args]


def submit(stack, config: str, env: dict, runs: str, timeout: int) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": env, "excludes": RUNTIME_EXCLUDES}
    return subprocess.run(
        ["ray", "job", "submit", "--address", stack["dashboard"], "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/train_ensemble.py", "--config", config, "--runs", runs],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def s3_data(stack):
    """Tiny-ImageNet shards on the S3 server, as a cluster would stream them."""
    fs = s3fs.S3FileSystem()
    prefix = f"{stack['bucket']}/data/tiny-imagenet-200"
    if not fs.exists(f"{prefix}/manifest.json"):
        fs.put(str(TINY) + "/", prefix + "/", recursive=True)
    return f"s3://{stack['bucket']}/data"


def children_of(client: MlflowClient, parent):
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def check_runs_file(runs, expected_members: int, num_classes: int):
    assert [m.status for m in runs.members] == ["finished"] * expected_members
    labels = np.load(s3fs.S3FileSystem().open(runs.dataset.labels) if runs.dataset.labels.startswith("s3://")
                     else runs.dataset.labels)
    assert labels.shape == (runs.dataset.samples,) and runs.dataset.num_classes == num_classes
    for m in runs.members:
        model, state = load_checkpoint(m.checkpoint, expect_arch=m.arch)
        assert state["num_classes"] == num_classes
        opener = s3fs.S3FileSystem().open if m.predictions.startswith("s3://") else open
        with opener(m.predictions, "rb") as f:
            probs = np.load(f)
        assert probs.dtype == np.float32 and probs.shape == (len(labels), num_classes)
        assert np.allclose(probs.astype(np.float32).sum(1), 1, atol=1e-2)
        # the recorded errors are those of the stored predictions, scored as ensemble.evaluate does
        assert topk_error(probs, labels, 1) == pytest.approx(m.metrics["top1_err"], abs=1e-6)
        assert topk_error(probs, labels, 5) == pytest.approx(m.metrics["top5_err"], abs=1e-6)
        assert m.eval.input_size == get_spec(m.arch).eval_transform(True, m.eval.input_size).input_size


@pytest.fixture(scope="module")
def resumed_smoke(stack, s3_data):
    """The documented local-stack `ray job submit` (docs/clusters.md) of configs/smoke.yaml, its driver killed
    (SIGKILL, by its pid) once a member has its first checkpoint, then the documented line
    again, which resumes and completes it: one trained ensemble that the cluster-path and
    the killed-driver tests both read."""
    from ray.job_submission import JobSubmissionClient

    run_id = uuid.uuid4().hex[:8]
    storage = f"s3://{stack['bucket']}/e2e-{run_id}"
    env = {"DATA_ROOT": s3_data, "ENSEMBLE_STORAGE": storage, "MLFLOW_EXPERIMENT": f"smoke-{run_id}",
           "GIT_COMMIT": "0123abcd"}
    runs_uri = f"{storage}/runs.yaml"
    command = readme_submit(stack, storage, {k: v for k, v in env.items() if k not in ("DATA_ROOT", "ENSEMBLE_STORAGE")})
    assert command[-6:] == ["python", "jobs/train_ensemble.py", "--config", "configs/smoke.yaml", "--runs", runs_uri]
    job = f"killed-{run_id}"
    at = command.index("--")
    subprocess.run(command[:at] + ["--no-wait", "--submission-id", job] + command[at:], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    fs = s3fs.S3FileSystem()
    deadline = time.time() + 600
    while not registered_checkpoints(fs, f"{storage}/smoke/train"):
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.5)
        fs.invalidate_cache()
    jobs = JobSubmissionClient(stack["dashboard"])
    killed_at = time.time()
    os.kill(int(jobs.get_job_info(job).driver_info.pid), 9)  # the driver dies without warning, its trials with it
    while str(jobs.get_job_status(job)).split(".")[-1] not in ("FAILED", "STOPPED"):
        assert time.time() < killed_at + 120, "the job outlived its driver"
        time.sleep(0.5)
    runs_before = fs.exists(runs_uri) or fs.exists(f"{storage}/smoke/runs.yaml")
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)  # the documented line
    return {"storage": storage, "env": env, "runs_uri": runs_uri, "first": again, "runs_before": runs_before}


@pytest.mark.stack
def test_a_killed_driver_resubmitted_resumes_its_members(stack, resumed_smoke):
    """After the kill there is no runs file; the same submission again resumes from the
    checkpoint, keeps each member's MLflow child run, and completes runs.yaml."""
    again = resumed_smoke["first"]
    assert not resumed_smoke["runs_before"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming after epoch" in again.stdout
    runs = load_runs(resumed_smoke["runs_uri"])
    check_runs_file(runs, 2, 10)
    client = MlflowClient(stack["mlflow"])
    children = children_of(client, client.get_run(runs.mlflow.parent_run_id))
    assert len(children) == 2  # the resumed member continued its own child run
    for child in children:
        steps = [h.step for h in client.get_metric_history(child.info.run_id, "val_top1_err")]
        assert sorted(steps) == [1, 2]  # each epoch logged once, the killed one included


@pytest.mark.stack
def test_cluster_path_smoke_job_on_s3_and_mlflow_server(stack, resumed_smoke):
    storage, env, runs_uri, first = (resumed_smoke[k] for k in ("storage", "env", "runs_uri", "first"))
    run_id = storage.rsplit("-", 1)[1]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "succeeded" in first.stdout + first.stderr

    # runs.yaml: every member with a checkpoint and predictions that load, from S3
    runs = load_runs(runs_uri)
    check_runs_file(runs, 2, 10)
    assert all(m.checkpoint.startswith(storage) for m in runs.members)

    # MLflow: one parent, a child per member with params, per-epoch curves and artifacts
    client = MlflowClient(stack["mlflow"])
    parent = client.get_run(runs.mlflow.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ray.job_id"].startswith("raysubmit_")
    assert parent.data.tags["mlflow.source.git.commit"] == "0123abcd"
    assert parent.data.params["data.classes"] == "10"
    children = children_of(client, parent)
    assert sorted(c.info.run_name for c in children) == sorted(m.name for m in runs.members)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["arch"] == child.data.tags["arch"]
        assert child.data.params["recipe.schedule.policy"] == "cosine"
        assert child.data.tags["data.share"].startswith(f"trains on share {int(child.data.params['share']) + 1} of 2")
        history = client.get_metric_history(child.info.run_id, "val_top5_err")
        assert [h.step for h in history] == [1, 2]
        files = {f.path for top in ("predictions", "plots") for f in client.list_artifacts(child.info.run_id, top)}
        assert {"predictions/predictions.npy", "predictions/labels.npy", "plots/lr_schedule.png",
                "plots/curves.png"} <= files

    # the artifacts are objects in the S3 bucket behind the MLflow server
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack["bucket"], Prefix="mlflow/")
            for o in page.get("Contents", [])]
    for child in children:
        assert any(child.info.run_id in k and k.endswith("predictions.npy") for k in keys)
    body = s3.get_object(Bucket=stack["bucket"], Key=next(k for k in keys if k.endswith("lr_schedule.png")))["Body"]
    assert body.read(8) == b"\x89PNG\r\n\x1a\n"

    # a second submission trains nothing: same members, same checkpoints, same children
    fs = s3fs.S3FileSystem()
    before = sorted(fs.find(f"{storage}/smoke/members"))
    # one stored copy of a finished member: its final weights (no optimiser state) and
    # predictions; the training checkpoints are gone, MLflow references the weights
    # (an S3 server may keep empty folder markers: no file of a checkpoint is what counts)
    assert not [p for p in fs.find(f"{storage}/smoke/train") if p.endswith((".pt", ".npy", ".json"))]
    for m, child in zip(sorted(runs.members, key=lambda m: m.name), sorted(children, key=lambda c: c.info.run_name)):
        assert child.data.tags["checkpoint_uri"] == m.checkpoint and m.checkpoint.startswith(f"{storage}/smoke/members/")
        assert "optimizer" not in torch.load(fs.open(m.checkpoint), map_location="cpu", weights_only=False)
        assert not client.list_artifacts(child.info.run_id, "checkpoint")
    second = submit(stack, "configs/smoke.yaml", env, runs_uri, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "2 already finished, 0 to train" in second.stdout
    assert sorted(fs.find(f"{storage}/smoke/members")) == before
    assert len(children_of(client, parent)) == 2
    assert load_runs(runs_uri).members == runs.members

    # the evaluation reads runs.yaml and predictions from S3 and logs to the parent run
    out = subprocess.run(["python", "-m", "ensemble.evaluate", "--members", runs_uri, "--out", "/tmp/e2e-report-" + run_id],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ensemble_top5_err" in client.get_run(parent.info.run_id).data.metrics

    # credentials never leave the environment: not in params, tags, text artifacts, runs.yaml or logs
    assert_no_credentials(client, [parent, *children], [first.stdout + first.stderr, second.stdout,
                                                        fs.cat(runs_uri).decode(), out.stdout + out.stderr])

    # every link the job printed, opened as a user opens it (a fresh headless Chromium, no
    # click): the model-training layout, the runs table with its val_top5_err column and the
    # ensemble's row, the parent's result table with the ensemble's row first
    import tempfile

    from bench.ui_screenshots import check_link

    links = re.findall(r"https?://\S+#/experiments/[^\s)]+", first.stdout)
    assert len(links) >= 2 and any("/runs/" in link.split("#")[1] for link in links), links
    names = [c.info.run_name for c in children]
    problems = [p for link in links for p in check_link(link, tempfile.mkdtemp(prefix="chromium-"), parent.info.run_name,
                                                        names, "ensemble (mean_softmax, 2 members)")]
    assert not problems, problems


def assert_no_credentials(client: MlflowClient, runs, texts: list[str]) -> None:
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    assert all(len(s) >= 8 for s in secrets)  # long enough not to match by chance
    seen = list(texts)
    for run in runs:
        seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        stack = [a for a in client.list_artifacts(run.info.run_id)]
        while stack:
            a = stack.pop()
            if a.is_dir:
                stack += client.list_artifacts(run.info.run_id, a.path)
            elif a.path.endswith((".yaml", ".json", ".csv", ".txt", ".md")):
                local = client.download_artifacts(run.info.run_id, a.path)
                seen.append(open(local, errors="replace").read())
    assert len(seen) > len(texts)
    for text in seen:
        for secret in secrets:
            assert secret not in text


def registered_checkpoints(fs, train_dir: str) -> list[str]:
    """Members' complete checkpoints: a single-worker member's `latest.json` pointer, or
    the latest one Ray Train has registered in a data-parallel member's run snapshot. In
    both, a checkpoint folder is uploaded before it is named; a run stopped in between
    restarts that epoch."""
    found = list(fs.glob(f"{train_dir}/*/latest.json"))
    for path in fs.glob(f"{train_dir}/*/checkpoint_manager_snapshot.json"):
        latest = json.loads(fs.cat(path)).get("latest_checkpoint_result")
        if latest:
            found.append(path)
    return found


@pytest.mark.stack
@pytest.mark.slow
def test_twenty_three_members_from_every_family(stack, s3_data):
    run_id = uuid.uuid4().hex[:8]
    storage = f"s3://{stack['bucket']}/e2e22-{run_id}"
    env = {"DATA_ROOT": s3_data, "ENSEMBLE_STORAGE": storage, "MLFLOW_EXPERIMENT": f"ci22-{run_id}"}
    out = submit(stack, "configs/ci-many.yaml", env, f"{storage}/runs.yaml", timeout=2400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = load_runs(f"{storage}/runs.yaml")
    check_runs_file(runs, 23, 5)
    assert len({get_spec(m.arch).family for m in runs.members}) == 7
    client = MlflowClient(stack["mlflow"])
    assert len(children_of(client, client.get_run(runs.mlflow.parent_run_id))) == 23


def test_embedded_default_path_with_nothing_running(tmp_path, tiny_root):
    """No Ray cluster, no MLflow server, no S3: a local Ray instance, ./mlruns, ./outputs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    # relative paths, as in the shipped configs: workers run in another folder than the driver
    env.update(RAY_ADDRESS="local", DATA_ROOT=os.path.relpath(TINY.parent, tmp_path), ENSEMBLE_STORAGE="./outputs")
    out = subprocess.run(["python", str(ROOT / "jobs/train_ensemble.py"), "--config", str(ROOT / "configs/smoke.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "top-5 err" in out.stdout and "resnet18-tiny-s0" in out.stdout  # the per-member table
    # the live board as plain lines (not a terminal): one per member epoch, no Tune trial tables
    assert re.search(r"member resnet18-tiny-s0 \(resnet18\): epoch 2/2, train loss [\d.]+, val top-1 err [\d.]+% top-5 err",
                     out.stdout)
    assert "Trial status" not in out.stdout
    # each member says, as it starts, which share of train it trains on (configs/smoke.yaml: shares 2)
    for name, share in (("resnet18-tiny-s0", 1), ("vgg11-tiny-s1", 2)):
        assert f"member {name}: trains on share {share} of 2 of train: 80 images" in out.stdout
    assert "repeated" not in out.stdout
    # ... and it ends with the ensemble against its best member on both metrics, in points; this
    # config has no minival, so the best member is the one best on val, and the line says so
    for k in (1, 5):
        assert re.search(rf"top-{k} error: ensemble [\d.]+% vs best on val \(optimistic\) \S+ [\d.]+%: [+-][\d.]+ "
                         rf"points", out.stdout)
    runs = load_runs(str(tmp_path / "runs.yaml"))
    check_runs_file(runs, 2, 10)
    assert runs.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(runs.mlflow.tracking_uri)
    parent = client.get_run(runs.mlflow.parent_run_id)
    assert {"job_ensemble_top1_err", "job_ensemble_top5_err", "job_gain_top1_points"} <= set(parent.data.metrics)
    note = parent.data.tags["mlflow.note.content"]
    assert "| **ensemble** (mean_softmax, 2 members)" in note
    assert note.index("**ensemble**") < min(note.index(m.name) for m in runs.members)  # first: the UI folds the rest
    # the UI opens the experiment in its model-training view, and the link the job prints opens
    # its saved view, where the parent's val errors (the ensemble's) rank it among the members
    tags = client.get_experiment(parent.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert json.loads(tags["mlflow.sharedViewState.ensembles"])["orderByKey"] == "metrics.`val_top5_err`"
    assert f"#/experiments/{parent.info.experiment_id}/runs?viewStateShareKey=ensembles" in out.stdout
    # every link printed opens the model-training layout; MLflow's own links (GenAI overview) are off
    links = re.findall(r"http://\S+#/experiments/\S+", out.stdout)
    assert len(links) >= 2 and all("workflowType=machine_learning" in link for link in links), links
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning" \
        in out.stdout
    assert "View run" not in out.stdout and "View experiment" not in out.stdout
    assert parent.data.metrics["val_top5_err"] == parent.data.metrics["job_ensemble_top5_err"]
    assert len(children_of(client, parent)) == 2
    assert (tmp_path / "outputs" / "smoke" / "runs.yaml").exists()
    assert any((tmp_path / "mlruns" / "artifacts").rglob("predictions.npy"))
    check_evaluation(tmp_path, runs, client)


def check_evaluation(tmp_path, runs, client):
    """`python -m ensemble.evaluate --members runs.yaml` on the smoke job's runs file: the
    report, its MLflow logging, the recompute path agreeing with the cached predictions,
    and the served ensemble agreeing with the report's combination."""
    import mlflow

    from ensemble.core.predictions import recompute
    from orchestrator.data.dataset import open_split

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    out = subprocess.run(["python", "-m", "ensemble.evaluate", "--members", str(tmp_path / "runs.yaml"),
                          "--out", str(tmp_path / "report"), "--json", str(tmp_path / "report.json"), "--log-model"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"]["samples"] == runs.dataset.samples
    for member, row in zip(runs.members, report["members"]):
        assert row["top1_err"] == pytest.approx(member.metrics["top1_err"])  # same split, same numbers
    parent = client.get_run(runs.mlflow.parent_run_id)
    assert parent.data.metrics["ensemble_top5_err"] == pytest.approx(report["ensemble"]["top5_err"])
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "ensemble_report")}
    assert "ensemble_report/size_curve.png" in logged and "ensemble_report/reliability.png" in logged

    # recompute from the checkpoint with the member's own eval transform == cached predictions
    member, ds = runs.members[0], runs.dataset
    fresh = recompute(member, ds.uri, ds.split, ds.classes, ds.per_class)
    cached = np.load(member.predictions).astype(np.float32)
    assert np.abs(fresh.rows(np.arange(len(cached))).numpy() - cached).max() < 2e-2
    assert (np.asarray(fresh.array).argmax(1) == cached.argmax(1)).mean() > 0.95

    # the logged pyfunc ensemble: top-5 classes with probabilities, equal to the mean softmax
    model_uri = out.stdout.split("ensemble model: ")[1].split()[0]
    mlflow.set_tracking_uri(runs.mlflow.tracking_uri)
    served = mlflow.pyfunc.load_model(model_uri)
    split = open_split(ds.uri, ds.split, ds.classes, ds.per_class)
    pred = served.predict([s.data for s in split.records[:4]])
    mean = sum(np.load(m.predictions).astype(np.float32) for m in runs.members) / len(runs.members)
    for i in range(4):
        assert pred["top5_classes"][i][0] == ds.class_names[int(mean[i].argmax())]
        assert pred["top5_probs"][i][0] == pytest.approx(float(mean[i].max()), abs=1e-2)
