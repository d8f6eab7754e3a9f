"""The MLflow layer: one parent run per ensemble job, one child run per member.

Only `MlflowClient` calls with explicit run ids, no fluent global state, so the parent
(job driver), the children (created by each member's Tune trial) and the per-epoch
metrics (logged by the member's rank-0 Ray Train worker) can live in different processes
on different machines. Re-running a job reuses its parent and each member's child, so a
resumed member continues as the same run instead of leaving a duplicate.

A stopped or restarting MLflow server delays logging rather than failing training: the
client retries every request with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES = 7,
factor 2: about 4 minutes), which tests/test_faults.py checks with the server down 30 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.config import flatten
from orchestrator.base.storage import absolute

PARENT_TAG, MEMBER_TAG, TRIAL_TAG, STORAGE_TAG = "ensemble.name", "member.key", "trial.id", "ensemble.storage"


def resolve_tracking_uri(configured: str | None, local_root: str = "./mlruns") -> str:
    """Config first, then MLFLOW_TRACKING_URI, else an embedded SQLite store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(local_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def embedded_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of the embedded store go in a folder beside its database."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


# The MLflow UI (3.x) opens an experiment in its GenAI view (traces, latency, tokens)
# unless the experiment says it holds model training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# A saved view of the runs table, shared through an experiment tag as the UI's "Share"
# button stores one (`mlflow.sharedViewState.<key>`, opened by `?viewStateShareKey=<key>`):
# the ensemble and its members in one flat list ranked by val top-5 error (sorted by a
# metric, the UI does not fold the members under their parent), with the columns a user
# compares them on. The parent run carries the ensemble's val errors under the members' names.
VIEW_KEY = "ensembles"
RUNS_VIEW = {
    "orderByKey": "metrics.`val_top5_err`", "orderByAsc": True,
    "selectedColumns": ["metrics.`val_top1_err`", "metrics.`val_top5_err`", "params.`arch`",
                        "params.`recipe_name`", "params.`seed`", "metrics.`images_per_s`"],
}


def runs_view_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs page in the MLflow UI at `ui`, opened on the view above."""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            f"&workflowType=machine_learning")


def run_page_url(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI at `ui`, in the model-training layout (MLflow 3's UI
    opens a run in its GenAI layout unless the URL or the browser's stored choice says otherwise)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def get_experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=embedded_artifact_root(client.tracking_uri))
        except Exception:  # created by a concurrent process meanwhile
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    tags = {} if exp is None else exp.tags
    if tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    view = json.dumps(RUNS_VIEW)
    if tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
        client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
    return exp_id


def git_commit() -> str:
    """The commit being run: GIT_COMMIT when set (`ray job submit` uploads the working tree
    without .git, so pass it in the runtime env), else asked of git."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def get_or_create_parent(client: MlflowClient, experiment_id: str, ensemble: str, tags: dict,
                         kind: str = "parent", storage: str = "") -> str:
    """The parent run of this ensemble (kind "parent") or search (kind "search") under this
    storage root: the existing one (a re-run resumes it) or a new one. The storage root is
    part of a run's identity (tag `ensemble.storage`): the same config run under another
    storage path is another run, with its own members. A parent from an earlier version,
    without the tag, is resumed when its `storage.path` param names the same root."""
    found = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{ensemble}' and tags.`ensemble.kind` = '{kind}'",
                               max_results=200, order_by=["attributes.start_time DESC"])
    ours = [r for r in found if r.data.tags.get(STORAGE_TAG) == storage] or [
        r for r in found if STORAGE_TAG not in r.data.tags and _same_root(r.data.params.get("storage.path"), storage)]
    if ours:
        run_id = ours[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=ensemble,
                                   tags={PARENT_TAG: ensemble, "ensemble.kind": kind}).info.run_id
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in {**tags, STORAGE_TAG: storage}.items()])
    return run_id


def _same_root(logged: str | None, root: str) -> bool:
    """An earlier version's `storage.path` param (as configured) against this job's root."""
    return logged is None or absolute(logged) == root


def get_or_create_child(client: MlflowClient, experiment_id: str, parent_id: str, member) -> str:
    found = client.search_runs([experiment_id], f"tags.`{MEMBER_TAG}` = '{member.key}' and "
                               f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=member.name, tags={
        "mlflow.parentRunId": parent_id, MEMBER_TAG: member.key, "member.name": member.name,
        "arch": member.arch, "seed": str(member.seed), "recipe": member.recipe_name,
        **({"member.role": member.role} if getattr(member, "role", None) else {})})
    params = flatten(member.model_dump(exclude={"key"}))
    # MLflow params are write-once; log_batch takes at most 100 per call.
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_epoch(client: MlflowClient, run_id: str, metrics: dict, epoch: int) -> None:
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, _shown(k, float(v)), ts, epoch) for k, v in metrics.items()
                                      if isinstance(v, (int, float))])


def _shown(key: str, value: float) -> float:
    """Error rates (computed in float32) as the 7 digits they hold: 0.662 in the UI, not
    0.6620000004768372; rates (images/s, timed on a shared machine) to 4 digits, 256.6 not
    256.608179...; every other metric exactly as measured (a weight fingerprint is
    compared for equality)."""
    if key.endswith("_err"):
        return float(f"{value:.7g}")
    return float(f"{value:.4g}") if key.endswith("_per_s") else value


def get_or_create_trial_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str, member,
                            overrides: dict) -> str:
    """A search trial's child run, reused when the trial restarts (a failure, or a PBT
    exploit step: the trial keeps its run; the perturbed values are logged as metrics
    `hp/<field>` per epoch, since MLflow params are write-once)."""
    found = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                               f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{member.name}-{trial_id}", tags={
        "mlflow.parentRunId": parent_id, TRIAL_TAG: trial_id, MEMBER_TAG: member.key, "arch": member.arch,
        "member.name": member.name})
    params = {**{f"search.{k}": v for k, v in overrides.items()},
              **flatten(member.model_dump(exclude={"key"}))}
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id
