"""What a member's training process does, whoever hosts it: resume, train, checkpoint
every epoch, and store the final predictions (val, and minival when there is one) once:
where the work says a finished member's files go (`MemberWork.final_uri`, read from there
by the record and the evaluation) and, from the same local files, on its MLflow run; with
no such place (a search trial), in the final checkpoint.

Three hosts provide a `Session` (rank, device, the latest checkpoint, a place to report
to): `ray_train.py`, a Ray Train worker of a data-parallel member, `in_trial.py`, the
Tune trial process of a single-worker member, and `search_trial.py`, a search trial.
The training itself is plain PyTorch from `orchestrator.train`.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from models import save_checkpoint
from orchestrator.base import storage
from orchestrator.config import MemberWork
from orchestrator.views.tracking import log_epoch
from orchestrator.train.member import CHECKPOINT_FILE, final_outputs, open_member_data, train_member


class Session(Protocol):
    rank: int
    world: int
    device: torch.device
    prepare_model: Callable
    report_may_stop: bool  # report() may end the process (a search scheduler): log the epoch before it

    def resume(self) -> tuple[dict | None, str]:
        """(the latest checkpoint's state, where it came from), or (None, "")."""

    def report(self, metrics: dict, folder: str | None) -> None:
        """One epoch's metrics, and rank 0's checkpoint folder (None on other ranks)."""

    def report_final_again(self, state: dict) -> None:
        """The member had finished before a restart: hand its final checkpoint back."""

    def epoch_fields(self, model) -> tuple[dict, dict]:
        """What this host adds to an epoch's (checkpoint, logged metrics): nothing for a
        member; a search trial's id and a fingerprint of the weights (search_trial.py)."""


def _gather(part: dict, world: int) -> list[dict]:
    if world == 1:
        return [part]
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return parts


def log_missing_epochs(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    """The checkpointed epochs whose metrics never reached MLflow (a kill between the save
    and the log), logged from the checkpoint's history: every step once, none skipped."""
    if not history:
        return
    logged = {m.step for m in client.get_metric_history(run_id, "epoch")}  # fit() sets it every epoch
    for epoch, metrics in enumerate(history, 1):
        if epoch not in logged:
            log_epoch(client, run_id, metrics, epoch)


def keep_final(files: dict[str, np.ndarray], work: MemberWork, checkpoint: str, client: MlflowClient | None) -> None:
    """Write the final prediction files once, before the final checkpoint is reported (a
    kill in between retrains the last epoch and writes them again): to `work.final_uri` and
    the member's MLflow run, or into the `checkpoint` folder when the work names no home."""
    if work.final_uri is None:
        for name, array in files.items():
            np.save(os.path.join(checkpoint, name), array)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, array in files.items():
            np.save(os.path.join(tmp, name), array)
        storage.put_dir(tmp, work.final_uri)
        for name in files if client is not None else ():
            client.log_artifact(work.mlflow_run_id, os.path.join(tmp, name), "predictions")


def run_member(work: MemberWork, session: Session) -> None:
    started = time.perf_counter()
    member = work.member
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(max(1, math.ceil(member.resources.cpus_per_worker)))
    resume, source = session.resume()
    if resume and rank == 0:
        print(f"member {member.name}: resuming after epoch {resume['epoch']} from {source}", flush=True)
    if resume and resume["epoch"] >= member.recipe.epochs:
        # Killed after its final checkpoint but before the job recorded it: hand the final
        # checkpoint (model, predictions) back as this run's result instead of retraining.
        session.report_final_again(resume)
        return

    data = open_member_data(work.data, member.share)
    run_id = work.mlflow_run_id
    client = MlflowClient(work.tracking_uri) if rank == 0 and run_id else None

    def on_epoch_end(state, metrics, model, optimizer, probs):
        final = probs is not None  # this rank's part of the final held-out predictions
        if final:
            files = final_outputs(probs, lambda part: _gather(part, world), model, member, data, metrics, device,
                                  rank, world)
            # the member's own work in this process: data, model, epochs, predictions
            metrics["member_s"] = time.perf_counter() - started
            if client is not None and "cost_machine" in metrics:  # where its inference cost was measured
                client.set_tag(run_id, "cost.machine", metrics["cost_machine"])
        saved, logged = session.epoch_fields(model)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                net = model.module if hasattr(model, "module") else model
                save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), arch=member.arch, num_classes=data.num_classes,
                                low_res=member.low_res, model=net, optimizer=optimizer.state_dict(),
                                epoch=state.epoch, step=state.step, history=state.history, metrics=metrics,
                                **saved)
                if final and files:
                    keep_final(files, work, tmp, client)
            if client is not None and session.report_may_stop:  # a scheduler may end the trial in report()
                log_epoch(client, run_id, {**metrics, **logged}, state.epoch)
            session.report(metrics, tmp if rank == 0 else None)
        # logged once the epoch's checkpoint is saved: a kill before this point retrains the
        # epoch (nothing logged twice); a kill after the save leaves it for the resume to log
        if client is not None and not session.report_may_stop:
            log_epoch(client, run_id, {**metrics, **logged}, state.epoch)

    if client is not None and resume:
        log_missing_epochs(client, run_id, resume.get("history", []))
    def on_notes(notes: dict) -> None:  # what the Hikvision options did, as tags on the member's run
        for tag, text in notes.items() if client is not None else ():
            client.set_tag(run_id, tag, text)

    train_member(member, data, device=device, rank=rank, world=world, resume=resume,
                 prepare_model=session.prepare_model, on_epoch_end=on_epoch_end, on_notes=on_notes)
