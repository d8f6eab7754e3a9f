"""One search trial: a Ray Tune function trainable that trains one sampled member.

A trial is a single worker (one GPU, or a fraction of one, so small trials pack), running
the same training core as an ensemble member, with the Tune touchpoints marked `# TUNE:`:
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

import math
import os
import tempfile

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from models import save_checkpoint
from orchestrator.config import JobContext, ResolvedMember
from orchestrator.search import space
from orchestrator.tracking import get_or_create_trial_run, log_epoch
from orchestrator.train.member import CHECKPOINT_FILE, final_outputs, open_member_data, train_member
from orchestrator import plots


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


def search_trial(config: dict, ctx: JobContext) -> None:
    base = ctx.members[config["base"]]
    overrides = {k: v for k, v in config.items() if k != "base"}
    member = space.apply(base, overrides)
    trial_id = tune.get_context().get_trial_id()  # TUNE: who this trial is
    use_gpu = member.resources.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    torch.set_num_threads(max(1, math.ceil(member.resources.cpus_per_worker)))

    resume = _restore()
    restored_from = resume.get("trial_id", "") if resume else ""
    # recomputed from the weights actually loaded, so equality with the donor's reported
    # fingerprint proves the clone
    restored_fp = fingerprint(resume["state_dict"]) if resume else float("nan")
    data = open_member_data(ctx.data)
    client = MlflowClient(ctx.tracking_uri)
    run_id = get_or_create_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id, member, overrides)
    if resume and restored_from != trial_id:
        print(f"trial {trial_id}: cloned the weights of trial {restored_from} after epoch {resume['epoch']}",
              flush=True)
        client.set_tag(run_id, "pbt.cloned_from", f"{restored_from}@{resume['epoch']}")
        client.log_metric(run_id, "cloned_fingerprint", restored_fp, step=resume["epoch"])
    extra = {"trial_id": trial_id, "restored_from": restored_from, "restored_fingerprint": restored_fp}
    notes: dict = {}  # what the recipe's Hikvision options did, filled by train_member

    def on_epoch_end(state, metrics, model, optimizer, probs):
        while notes:
            client.set_tag(run_id, *notes.popitem())
        final = probs is not None  # the final epoch's held-out predictions
        files = final_outputs(probs, lambda part: [part], model, member, data, metrics, device) if final else {}
        fp = fingerprint(model.state_dict())
        log_epoch(client, run_id, {**metrics, **numeric(overrides), "fingerprint": fp}, state.epoch)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), arch=member.arch, num_classes=data.num_classes,
                            low_res=member.low_res, model=model, optimizer=optimizer.state_dict(), epoch=state.epoch,
                            step=state.step, history=state.history, metrics=metrics, trial_id=trial_id,
                            fingerprint=fp, overrides=overrides)
            for name, array in files.items():
                np.save(os.path.join(tmp, name), array)
            if final:
                _log_final(client, run_id, tmp, member, state.history, list(files))
            tune.report({**metrics, **extra, "fingerprint": fp, "member_key": member.key},  # TUNE
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    if resume and resume["epoch"] >= member.recipe.epochs:
        return  # already complete: its final checkpoint was reported before the restart
    train_member(member, data, device=device, resume=resume, on_epoch_end=on_epoch_end, notes=notes)
    client.set_terminated(run_id, "FINISHED")


def _log_final(client: MlflowClient, run_id: str, folder: str, member: ResolvedMember, history: list[dict],
               files: list[str]) -> None:
    for name in files:
        client.log_artifact(run_id, os.path.join(folder, name), "predictions")
    with tempfile.TemporaryDirectory() as tmp:
        plots.plot_curves(os.path.join(tmp, "curves.png"), history, member.name)
        client.log_artifact(run_id, os.path.join(tmp, "curves.png"), "plots")
