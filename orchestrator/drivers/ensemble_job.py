"""The ensemble job's driver: check inputs, start tracking, run members, write runs.yaml.

`jobs/train_ensemble.py` only parses arguments and calls `run`. Everything the user can
get wrong (config, names, data path, class counts, storage, resources) is checked here
before any member starts, each as one `UserError` line.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import yaml
from rich.table import Table

from orchestrator.base import storage
from orchestrator.config import (THIS_JOB, EnsembleConfig, JobContext, ResolvedMember, load_config, resolve_members,
                                 resolve_students)
from orchestrator.data.dataset import open_split, select_classes
from orchestrator.data.manifest import check_shards_exist, load_manifest
from orchestrator.base.errors import UserError
from orchestrator.records.from_job import imported, runs_file
from orchestrator.records.member import StoredMember, member_record
from orchestrator.records.moved import keys_after_a_move
from orchestrator.base.lease import Lease
from orchestrator.base.outages import check_tracking
from orchestrator.records.runs_file import MlflowRef, RunsFile, load_runs, write_runs
from orchestrator.views.terminal import console
from orchestrator.train.resident_batches import resident_choice
from orchestrator.views import tracking
from orchestrator.runtime import launch
from orchestrator.config import flatten



def load_and_check(path: str) -> tuple[EnsembleConfig, list[ResolvedMember]]:
    cfg = load_config(path)
    # Relative local paths are relative to where the job was started; Ray workers run
    # elsewhere, so they get absolute ones.
    cfg.data.root = storage.absolute(cfg.data.root)
    members = resolve_members(cfg)  # unknown arch / recipe / policy / preset -> UserError
    check_data(cfg)
    imported(cfg, members)
    if cfg.distill is not None:  # the student's arch, recipe and name, before any member trains
        resolve_students(cfg, cfg.distill.teacher, ["-"])
        if cfg.distill.teacher != THIS_JOB:
            load_runs(cfg.distill.teacher)
    return cfg, members


def check_data(cfg: EnsembleConfig) -> None:
    """The data the config names exists and agrees with it (before anything starts)."""
    manifest = load_manifest(cfg.data.root)
    if cfg.data.num_classes is not None and cfg.data.num_classes != manifest.num_classes:
        raise UserError(f"data.num_classes is {cfg.data.num_classes} but {cfg.data.root}/manifest.json "
                        f"lists {manifest.num_classes}")
    select_classes(manifest, cfg.data.classes)
    for split in (cfg.data.train_split, cfg.data.val_split):
        check_shards_exist(manifest, split)


def print_plan(cfg: EnsembleConfig, members: list[ResolvedMember]) -> None:
    table = Table(title=f"ensemble {cfg.name}: {len(members)} members")
    for col in ("member", "key", "arch", "recipe", "epochs", "input", "low_res", "workers", "gpus"):
        table.add_column(col)
    students = resolve_students(cfg, cfg.distill.teacher, ["-"]) if cfg.distill is not None else []
    for m in members + students:
        r = m.resources
        table.add_row(m.name, m.key, m.arch, m.recipe_name, str(m.recipe.epochs), f"{m.input_size} px",
                      "on" if m.low_res else "off", str(r.workers), str(r.gpus_per_worker) if r.use_gpu else "cpu")
    console().print(table)
    train = open_split(cfg.data.root, cfg.data.train_split, cfg.data.classes, cfg.data.train_per_class)
    placements = {m.name: resident_choice(m, cfg.data.resident, train,
                                          torch.device("cuda" if m.resources.use_gpu else "cpu"))[1] for m in members}
    for where in sorted(set(placements.values())):  # data.resident, as each member will decide it
        names = [n for n, w in placements.items() if w == where]
        console().print(f"train data, {len(names)} of {len(members)} members: {where}")


def _ray_init(cfg: EnsembleConfig) -> None:
    import ray

    # Keep a local Ray on loopback and quiet; an existing cluster's settings win.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, include_dashboard=False, log_to_driver=True,
                 configure_logging=False) if cfg.ray.address else ray.init(configure_logging=False)


def start_ray_for(cfg: EnsembleConfig, client, parent: str) -> None:
    """Ray, started (or joined) once there is work, and its job id on the parent run."""
    _ray_init(cfg)
    client.set_tag(parent, "ray.job_id", _job_id())


def _job_id() -> str:
    """The `ray job submit` submission id (raysubmit_...) when submitted, else Ray's job id
    ("" before Ray has started). The job supervisor hands the driver its metadata in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    import json

    import ray

    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    except json.JSONDecodeError:
        meta = {}
    return meta.get("job_submission_id") or (ray.get_runtime_context().get_job_id() if ray.is_initialized() else "")


def _result_table(records: list[dict]) -> Table:
    table = Table(title="members (val split)")
    for col in ("member", "arch", "status", "top-1 err", "top-5 err", "images/s", "minutes"):
        table.add_column(col, justify="right" if col not in ("member", "arch", "status") else "left")
    for r in records:
        m = r.get("metrics", {})
        fmt = lambda k, f: f.format(m[k]) if k in m else "-"  # noqa: E731
        table.add_row(r["name"], r["arch"], r["status"], fmt("top1_err", "{:.2%}"), fmt("top5_err", "{:.2%}"),
                      fmt("images_per_s", "{:.0f}"), fmt("minutes", "{:.2f}"))
    return table


@contextlib.contextmanager
def open_job(cfg: EnsembleConfig, config_path: str, kind: str, tags: dict, start_ray: bool = True):
    """What every job driver does first: a writable storage root whose bucket exists, the
    job's lease on it (one job per ensemble and storage path), the tracking store, Ray
    (unless `start_ray` is off: `start_ray_for` starts it when there is work), and the
    job's MLflow parent run (reused by a re-run with the same storage) with the config
    logged. Yields (storage root, tracking URI, client, experiment id, parent run id); the
    lease is released when the job ends."""
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking(tracking_uri)
    root = storage.absolute(cfg.storage.path)
    storage.check_writable(root, cfg.storage.create_bucket)
    with Lease(root, cfg.name, os.environ.get("RAY_JOB_SUBMISSION_ID", "")):
        client = MlflowClient(tracking_uri)
        experiment_id = tracking.get_experiment_id(client, cfg.mlflow.experiment)
        if start_ray:
            _ray_init(cfg)
        job = {"ray.job_id": job_id} if (job_id := _job_id()) else {}
        parent = tracking.get_or_create_parent(client, experiment_id, cfg.name, {
            "mlflow.source.git.commit": tracking.git_commit(), **job,
            "ensemble.config": os.path.basename(config_path), **tags}, kind=kind, storage=root)
        _log_config(client, parent, cfg)
        yield root, tracking_uri, client, experiment_id, parent


def run(cfg: EnsembleConfig, members: list[ResolvedMember], config_path: str,
        runs_path: str) -> tuple[RunsFile, list[str]]:
    tags = {"ensemble.members": len(members)}
    # Ray starts only when a member is left to train: a re-run of a finished job, or an
    # ensemble of imported runs, writes its runs file in seconds
    with open_job(cfg, config_path, "parent", tags, start_ray=False) as (root, tracking_uri, client, experiment_id,
                                                                         parent):
        ctx = JobContext(ensemble=cfg.name, storage=root, data=cfg.data, tracking_uri=tracking_uri,
                         experiment_id=experiment_id, parent_run_id=parent, max_failures=cfg.ray.max_failures,
                         members={m.key: m for m in members})
        members, kept = keys_after_a_move(cfg, members, ctx)
        if kept:
            ctx = ctx.model_copy(update={"members": {m.key: m for m in members}})
            console().print("\n".join(kept))
        pending = _pending(ctx, members)
        console().print(f"ensemble [bold]{cfg.name}[/]: {len(members)} members, {len(members) - len(pending)} already "
                      f"finished, {len(pending)} to train; MLflow {tracking_uri} run {parent}")
        _train(cfg, ctx, pending, client, parent)
        records, failed = _collect(ctx, members)
        extra = imported(cfg, members)
        runs = runs_file(cfg, records, extra, MlflowRef(tracking_uri=tracking_uri, experiment=cfg.mlflow.experiment,
                                                        parent_run_id=parent))
        # a copy beside the members' records: under `ray job submit` the driver's working
        # directory is a temporary copy, so this is the one a user can always find (and the
        # one a student of this job's ensemble learns from)
        copy = storage.join(root, cfg.name, "runs.yaml")
        _write(runs_path, copy, runs)
        if cfg.distill is not None:
            students = distilled(cfg, runs, copy)
            ctx = ctx.model_copy(update={"members": {**ctx.members, **{m.key: m for m in students}}})
            _train(cfg, ctx, _pending(ctx, students), client, parent)
            more, failed_too = _collect(ctx, students)
            runs, failed = runs.model_copy(update={"members": runs.members + [r.record() for r in more]}), \
                failed + failed_too
            records += more
            _write(runs_path, copy, runs)
        _log_runs_file(client, parent, runs)
        console().print(_result_table([r.model_dump() for r in [*records, *extra]]))
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        console().print(f"runs file: {storage.join(root, cfg.name, 'runs.yaml')}")
        if failed:
            console().print(f"[red]{len(failed)} member(s) failed: {', '.join(failed)}[/] (marked failed in {runs_path})")
        return runs, failed


def _pending(ctx: JobContext, members: list[ResolvedMember]) -> list[ResolvedMember]:
    return [m for m in members if not storage.read_json(ctx.record_uri(m.key))]


def _train(cfg: EnsembleConfig, ctx: JobContext, pending: list[ResolvedMember], client, parent: str) -> None:
    """The pending members, as many at once as the cluster allows (Ray started for them)."""
    import ray

    if not pending:
        return
    start_ray_for(cfg, client, parent)
    concurrency = launch.plan_concurrency(pending, ray.cluster_resources(), cfg.ray.max_concurrent_members)
    console().print(f"running up to {concurrency} members at once on {ray.cluster_resources().get('CPU', 0):g} CPUs"
                    f" / {ray.cluster_resources().get('GPU', 0):g} GPUs")
    launch.run_members(pending, ctx, concurrency, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", console())


def distilled(cfg: EnsembleConfig, runs: RunsFile, copy: str) -> list[ResolvedMember]:
    """The distill step's student and twin, learning from this job's ensemble (its runs
    file's stored copy) or from the runs file the step names."""
    teacher = copy if cfg.distill.teacher == THIS_JOB else cfg.distill.teacher
    of = runs if teacher == copy else load_runs(teacher)
    names = cfg.distill.teacher_members or [m.name for m in of.ensemble_members()]
    if not names:
        raise UserError(f"distill: {teacher} has no finished member to learn from")
    students = resolve_students(cfg, teacher, names)
    console().print(f"distillation: {', '.join(m.name for m in students)} (T {cfg.distill.temperature:g}, alpha "
                    f"{cfg.distill.alpha:g}) from {len(names)} members of {teacher}")
    return students


def _write(runs_path: str, copy: str, runs: RunsFile) -> None:
    write_runs(runs_path, runs)
    write_runs(copy, runs)


def _log_runs_file(client, run_id: str, runs: RunsFile) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_runs(os.path.join(tmp, "runs.yaml"), runs)
        client.log_artifact(run_id, os.path.join(tmp, "runs.yaml"))


def _log_config(client, run_id: str, cfg: EnsembleConfig) -> None:
    import tempfile

    from mlflow.entities import Param

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ensemble_config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
        client.log_artifact(run_id, path)
    existing = client.get_run(run_id).data.params
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in existing]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])


def _collect(ctx: JobContext, members: list[ResolvedMember]) -> tuple[list[StoredMember], list[str]]:
    records, failed = [], []
    for m in members:
        rec = storage.read_json(ctx.record_uri(m.key))
        if rec is None:
            rec = storage.read_json(ctx.record_uri(m.key) + ".failed") or member_record(
                m, None, status="failed", error="did not finish").model_dump()
            failed.append(m.name)
        records.append(StoredMember.model_validate(rec))
    return records, failed


