"""One search trial: a Ray Tune function trainable that trains one sampled member.

A trial is a single worker (one GPU, or a fraction of one, so small trials pack), and a
third host of `member_worker.run_member`, the code every ensemble member trains through;
its `SearchTrialSession` holds what a search adds, with the Tune touchpoints marked `# TUNE:`:
one `tune.report` per epoch carrying a checkpoint, so ASHA can stop a trial after any
epoch, and Population Based Training can clone it. On start the trial restores
`tune.get_checkpoint()`: its own after a failure, or, after a PBT exploit step, the
*donor's* (Tune hands the donor's latest checkpoint to the exploited trial, with the
perturbed config; Ray Tune docs, "A Guide to Population Based Training"). The weights,
optimiser state, epoch and history continue from the donor; the LR and augmentation
follow the new config from the next step. Each checkpoint records the trial that wrote it
and a fingerprint of its weights, so the clone is visible (and tested).
"""
from __future__ import annotations

import os
import tempfile

import torch
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.config import JobContext, ResolvedMember
from orchestrator.config import search_space as space
from orchestrator.views.tracking import get_or_create_trial_run
from orchestrator.runtime.member_worker import run_member
from orchestrator.train.member import CHECKPOINT_FILE, PREDICTION_FILES
from orchestrator.views import plots


def fingerprint(state_dict: dict) -> float:
    """A number that changes with any weight: equal fingerprints = the same weights."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(state_dict.values())
                         if p.is_floating_point()))


def numeric(overrides: dict) -> dict[str, float]:
    return {f"hp/{k}": float(v) for k, v in overrides.items() if isinstance(v, (int, float))}


def _restore() -> dict | None:
    ckpt = tune.get_checkpoint()  # TUNE: own checkpoint after a failure, the donor's after a PBT exploit
    if not ckpt:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)


class SearchTrialSession:
    """A member_worker.Session for a search trial: rank 0 of 1 in its Tune trial, resuming
    from Tune's checkpoint, reporting each epoch to Tune with its checkpoint (ASHA and PBT
    decide on it), and logging the final predictions and curves to the trial's MLflow run."""

    report_may_stop = True  # ASHA and PBT end a trial inside tune.report

    def __init__(self, member: ResolvedMember, trial_id: str, overrides: dict, resume: dict | None,
                 client: MlflowClient, run_id: str):
        use_gpu = member.resources.use_gpu and torch.cuda.is_available()
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.prepare_model = lambda model: model.to(self.device)
        self.member, self.trial_id, self.overrides, self._resume = member, trial_id, overrides, resume
        self.client, self.run_id = client, run_id
        restored_from = resume.get("trial_id", "") if resume else ""
        # recomputed from the weights actually loaded, so equality with the donor's reported
        # fingerprint proves the clone
        self.extra = {"trial_id": trial_id, "restored_from": restored_from,
                      "restored_fingerprint": fingerprint(resume["state_dict"]) if resume else float("nan")}
        self._fingerprint = float("nan")

    def resume(self) -> tuple[dict | None, str]:
        return self._resume, f"trial {self.extra['restored_from'] or self.trial_id}'s checkpoint"

    def epoch_fields(self, model) -> tuple[dict, dict]:
        self._fingerprint = fingerprint(model.state_dict())
        return ({"trial_id": self.trial_id, "fingerprint": self._fingerprint, "overrides": self.overrides},
                {**numeric(self.overrides), "fingerprint": self._fingerprint})

    def report(self, metrics: dict, folder: str | None) -> None:
        if metrics["epoch"] >= self.member.recipe.epochs:
            _log_final(self.client, self.run_id, folder, self.member)
        tune.report({**metrics, **self.extra, "fingerprint": self._fingerprint,  # TUNE
                     "member_key": self.member.key}, checkpoint=tune.Checkpoint.from_directory(folder))

    def report_final_again(self, state: dict) -> None:
        """Nothing to hand back: its final checkpoint was reported before the restart."""


def search_trial(config: dict, ctx: JobContext) -> None:
    """Tune function trainable: the member `config` samples from a base, trained by
    member_worker.run_member like any member."""
    overrides = {k: v for k, v in config.items() if k != "base"}
    member = space.apply(ctx.members[config["base"]], overrides)
    trial_id = tune.get_context().get_trial_id()  # TUNE: who this trial is
    resume = _restore()
    client = MlflowClient(ctx.tracking_uri)
    run_id = get_or_create_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id, member, overrides)
    session = SearchTrialSession(member, trial_id, overrides, resume, client, run_id)
    restored_from = session.extra["restored_from"]
    if resume and restored_from != trial_id:
        print(f"trial {trial_id}: cloned the weights of trial {restored_from} after epoch {resume['epoch']}",
              flush=True)
        client.set_tag(run_id, "pbt.cloned_from", f"{restored_from}@{resume['epoch']}")
        client.log_metric(run_id, "cloned_fingerprint", session.extra["restored_fingerprint"], step=resume["epoch"])
    run_member(ctx.work(member, run_id, keep=False), session)
    client.set_terminated(run_id, "FINISHED")


def _log_final(client: MlflowClient, run_id: str, folder: str, member: ResolvedMember) -> None:
    """The final checkpoint's predictions and the trial's curves, on its MLflow run."""
    for name in PREDICTION_FILES:
        if os.path.exists(os.path.join(folder, name)):
            client.log_artifact(run_id, os.path.join(folder, name), "predictions")
    history = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=False)["history"]
    with tempfile.TemporaryDirectory() as tmp:
        plots.plot_curves(os.path.join(tmp, "curves.png"), history, member.name)
        client.log_artifact(run_id, os.path.join(tmp, "curves.png"), "plots")
