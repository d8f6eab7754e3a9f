"""The Tune layer: one Tune trial per member.

A single-worker member trains inside its trial process (`in_trial.py`), which holds the
member's CPUs and GPU share and is reused for the next member (`reuse_actors`). A
data-parallel member's trial launches its TorchTrainer: Ray Train V2 does not run
`Tuner(trainer)`; the supported pattern is a Tune *function* trainable that calls
`TorchTrainer(...).fit()` and forwards its reports with `TuneReportCallback` (Ray docs,
"Hyperparameter tuning with Ray Tune", Train V2). Tune then runs as many members at once
as the cluster has resources for.

After a member finishes training, its trial logs the member's artifacts to its
MLflow child run and writes the member's record; a record means "finished", so a re-run
of the job skips that member, while an unfinished member resumes from its latest
checkpoint (a TorchTrainer finds its run under the same name and storage path).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import traceback

import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import train, tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.execution.placement_groups import PlacementGroupFactory

from orchestrator.base import storage
from orchestrator.config import JobContext, ResolvedMember
from orchestrator.records.member import member_record
from orchestrator.base.errors import UserError
from orchestrator.runtime import in_trial
from orchestrator.runtime.ray_train import train_loop_per_worker
from orchestrator.views.tracking import get_or_create_child
from orchestrator.train.lr import scaled_lr
from orchestrator.train.member import (CHECKPOINT_FILE, LABELS_FILE, MINIVAL_LABELS_FILE, MINIVAL_PREDICTIONS_FILE,
                                       PREDICTION_FILES, PREDICTIONS_FILE)
from orchestrator.views import plots
from orchestrator.views.progress import MemberBoard, quiet_tune


def checkpoint_config() -> train.CheckpointConfig:
    """The member is its final epoch: only the latest checkpoint is kept, none is picked by
    a held-out score (that would be a choice made on the split that is then reported)."""
    return train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="epoch", checkpoint_score_order="max")


def build_trainer(member: ResolvedMember, ctx: JobContext, run_id: str | None) -> TorchTrainer:
    r = member.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    fs, path = storage.ray_storage(storage.join(ctx.member_dir, "train"))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"work": ctx.work(member, run_id)},  # Ray Train passes a dict
        scaling_config=train.ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu, resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=member.key,  # same name + storage path = resume from the latest checkpoint
            storage_path=path, storage_filesystem=fs,
            checkpoint_config=checkpoint_config(),
            failure_config=train.FailureConfig(max_failures=ctx.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )


# what of a training checkpoint the finished member keeps: its weights and how it got there
FINAL_KEYS = ("arch", "num_classes", "low_res", "state_dict", "epoch", "step", "metrics", "history")


def finalize(member: ResolvedMember, ctx: JobContext, ckpt_uri: str, tmp: str) -> tuple[str, str, list[dict]]:
    """Store the finished member's final weights, without optimiser state, under
    `final_uri`, beside the prediction files its last epoch wrote there
    (member_worker.keep_final). A checkpoint of an earlier version carries its prediction
    files: those are moved along. Returns that URI, the local folder it was written from
    (inside `tmp`) and the per-epoch history."""
    local = storage.local_dir(ckpt_uri, os.path.join(tmp, "checkpoint"))
    state = torch.load(os.path.join(local, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    out = os.path.join(tmp, "final")
    os.makedirs(out)
    torch.save({k: state[k] for k in FINAL_KEYS if k in state}, os.path.join(out, CHECKPOINT_FILE))
    for name in PREDICTION_FILES:
        if os.path.exists(os.path.join(local, name)):
            shutil.copyfile(os.path.join(local, name), os.path.join(out, name))
    uri = ctx.final_uri(member.key)
    storage.put_dir(out, uri)
    return uri, out, state["history"]


def _log_artifacts(client: MlflowClient, run_id: str, member: ResolvedMember, local: str, history: list[dict],
                   steps_per_epoch: int) -> None:
    """Log the member's plots (its predictions were logged as they were written, except
    those `finalize` moved from an earlier version's checkpoint into `local`); its weights
    are referenced (tag `checkpoint_uri`), not copied: one stored copy."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in PREDICTION_FILES:
            if os.path.exists(os.path.join(local, name)):
                client.log_artifact(run_id, os.path.join(local, name), "predictions")
        recipe = member.recipe
        base_lr = scaled_lr(recipe.optimizer.lr, recipe.batch_size * member.resources.workers)
        plots.plot_lr_schedule(os.path.join(tmp, "lr_schedule.png"), recipe.schedule, base_lr, steps_per_epoch,
                               recipe.epochs, member.name)
        plots.plot_curves(os.path.join(tmp, "curves.png"), history, member.name)
        with open(os.path.join(tmp, "member.yaml"), "w") as f:
            yaml.safe_dump(member.model_dump(mode="json"), f, sort_keys=False)
        for name in ("lr_schedule.png", "curves.png", "member.yaml"):
            client.log_artifact(run_id, os.path.join(tmp, name), "plots" if name.endswith(".png") else None)


def failure_message(exc: BaseException) -> str:
    """The root cause in one line: Ray Train wraps a worker's exception (NonFiniteLoss,
    TooManyBadImages, ...) in a WorkerGroupError whose first line names neither."""
    causes = list(getattr(exc, "worker_failures", {}).values()) or [exc]
    text = "\n".join(f"{type(c).__name__}: {c}" for c in causes)
    named = [line.strip() for line in text.splitlines()
             if re.match(r"^\s*[\w.]+(Error|Exception|Loss|Images)\b: ", line) and "WorkerGroupError" not in line]
    return (named[-1] if named else text.splitlines()[0])[:500]


def _train(member: ResolvedMember, ctx: JobContext, run_id: str | None) -> tuple[dict, str]:
    """`run_member` in this trial's process or on a TorchTrainer's workers; returns (its final
    metrics, its final checkpoint's URI)."""
    if in_trial.eligible(member):
        checkpoints = ctx.training_uri(member.key)
        return in_trial.run_here(ctx.work(member, run_id), checkpoints, ctx.max_failures)
    result = build_trainer(member, ctx, run_id).fit()
    return result.metrics, storage.checkpoint_uri(ctx.storage, result.checkpoint.path)


def member_trial(config: dict, ctx: JobContext) -> None:
    """Tune function trainable: train one member end to end."""
    member = ctx.members[config["member_key"]]
    client = MlflowClient(ctx.tracking_uri)
    run_id = get_or_create_child(client, ctx.experiment_id, ctx.parent_run_id, member)
    try:
        final, ckpt_uri = _train(member, ctx, run_id)
    except Exception as exc:
        # The member fails loudly (FAILED in MLflow, a failed record); the rest go on.
        message = failure_message(exc)
        client.set_tag(run_id, "failure", message)
        client.set_terminated(run_id, "FAILED")
        storage.write_json(ctx.record_uri(member.key) + ".failed",
                           member_record(member, run_id, status="failed", error=message).model_dump())
        traceback.print_exc()
        # Returning (not raising) ends the trial: the member was already retried
        # (FailureConfig), so Tune's own retries are kept for a trial whose process or
        # node died, where they resume the member from its checkpoint.
        return
    steps_per_epoch = int(final["steps_per_epoch"])
    with tempfile.TemporaryDirectory() as tmp:
        kept, local, history = finalize(member, ctx, ckpt_uri, tmp)
        _log_artifacts(client, run_id, member, local, history, steps_per_epoch)
    client.set_tag(run_id, "checkpoint_uri", storage.join(kept, CHECKPOINT_FILE))
    client.set_terminated(run_id, "FINISHED")
    storage.write_json(ctx.record_uri(member.key), member_record(
        member, run_id, final=final, history=history, status="finished",
        checkpoint=storage.join(kept, CHECKPOINT_FILE), predictions=storage.join(kept, PREDICTIONS_FILE),
        labels=storage.join(kept, LABELS_FILE), **minival_files(ctx, kept)).model_dump())
    # recorded: the training checkpoints (optimiser state included) are no longer needed
    storage.remove(ctx.training_uri(member.key))


def minival_files(ctx: JobContext, ckpt_uri: str) -> dict:
    """A member trained with a minival: where its minival predictions and labels are."""
    if not ctx.data.minival:
        return {}
    return {"minival_predictions": storage.join(ckpt_uri, MINIVAL_PREDICTIONS_FILE),
            "minival_labels": storage.join(ckpt_uri, MINIVAL_LABELS_FILE)}


def worker_demand(member: ResolvedMember) -> dict[str, float]:
    """What the member's training processes hold: its trial process for a single-worker
    member, else its Ray Train worker group (gang-scheduled as one placement group)."""
    r = member.resources
    demand = {"CPU": r.workers * r.cpus_per_worker}
    if r.use_gpu:
        demand["GPU"] = r.workers * r.gpus_per_worker
    return demand


def trial_demand(member: ResolvedMember) -> dict[str, float]:
    """What the member's Tune trial asks for."""
    return worker_demand(member) if in_trial.eligible(member) else {"CPU": member.resources.trial_cpus}


def total_demand(member: ResolvedMember) -> dict[str, float]:
    extra = member.resources.trial_cpus
    return {res: amount + (extra if res == "CPU" else 0) for res, amount in worker_demand(member).items()}


def plan_concurrency(members: list[ResolvedMember], cluster: dict, cap: int | None) -> int:
    """How many member trials to run at once.

    A data-parallel member's trial holds `trial_cpus` (0.25) while its worker group waits for
    resources, so too many such trials could hold the CPUs the worker groups need, and
    none would ever start. Worker groups are gang-scheduled (all or nothing), so progress
    is guaranteed while the CPUs left over by the waiting trials fit the largest group:
        trials x trial_cpus + largest group <= cluster CPUs.
    (A single-worker member's trial starts only with all it needs, and never waits.)
    Beyond that, no more trials than could train at once. A member that can never fit
    (more GPUs than the cluster has) is refused here, not left pending forever.
    """
    demands = [total_demand(m) for m in members]
    for m, d in zip(members, demands):
        for res, amount in d.items():
            if amount > cluster.get(res, 0):
                raise UserError(f"member {m.name} needs {amount:g} {res} but the cluster has "
                                f"{cluster.get(res, 0):g}; lower its resources.workers or *_per_worker")
    waiting = [m for m in members if not in_trial.eligible(m)]
    safe = len(members)
    if waiting:
        largest = max(worker_demand(m)["CPU"] for m in waiting)
        safe = math.floor((cluster["CPU"] - largest) / waiting[0].resources.trial_cpus + 1e-9)
    useful = math.floor(cluster["CPU"] / min(d["CPU"] for d in demands) + 1e-9)
    if all("GPU" in d for d in demands):
        useful = min(useful, math.floor(cluster["GPU"] / min(d["GPU"] for d in demands) + 1e-9))
    return max(1, min(safe, useful, cap or len(members), len(members)))


def run_members(members: list[ResolvedMember], ctx: JobContext, concurrency: int, run_name: str, console=None):
    """Run every member as a Tune trial, shown live on `console` (orchestrator/views/progress.py);
    returns Tune's ResultGrid."""
    log_path = os.path.abspath(os.path.join("logs", f"{run_name}.log"))
    log_uri = storage.join(ctx.member_dir, "logs", f"{run_name}.log")
    board = MemberBoard(members, "minival" if ctx.data.minival else "val", console,
                        concurrency=concurrency, log_path=log_path, log_uri=log_uri)
    by_key = {m.key: m for m in members}

    def resources(config: dict) -> PlacementGroupFactory:
        return PlacementGroupFactory([trial_demand(by_key[config["member_key"]])])

    trainable = tune.with_resources(tune.with_parameters(member_trial, ctx=ctx), resources)
    fs, path = storage.ray_storage(storage.join(ctx.member_dir, "tune"))
    tuner = tune.Tuner(
        trainable,
        param_space={"member_key": tune.grid_search([m.key for m in members])},
        # a finished trial's process takes the next member with the same resource request
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=ctx.max_failures),
                                  callbacks=[board], verbose=0),  # the board replaces Tune's trial tables
    )
    try:
        with quiet_tune(log_path):
            return tuner.fit()
    finally:
        board.stop()
        board.sync_log()
