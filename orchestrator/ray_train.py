"""The Ray Train layer: the per-worker function of a member's `TorchTrainer`.

Plain PyTorch from `orchestrator.train`, with the Ray touchpoints marked `# RAY:`:
the worker's rank and device, resuming from the run's latest checkpoint, DDP wrapping,
and one `ray.train.report` per epoch carrying a checkpoint (rank 0 writes it; Ray
uploads it to the run's storage, local or s3://). The last epoch's checkpoint also
holds the member's val predictions in dataset order, scored once per sample.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mlflow.tracking import MlflowClient

from models import save_checkpoint
from orchestrator.config import Data, ResolvedMember
from orchestrator.tracking import log_epoch
from orchestrator.train.member import assemble_predictions, open_member_data, predict, split_labels, train_member

CHECKPOINT_FILE, PREDICTIONS_FILE, LABELS_FILE = "model.pt", "predictions.npy", "labels.npy"


def _gather(part: dict, world: int) -> list[dict]:
    if world == 1:
        return [part]
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return parts


def train_loop_per_worker(config: dict) -> None:
    started = time.perf_counter()
    member = ResolvedMember.model_validate(config["member"])
    ctx = ray.train.get_context()  # RAY: rank and world size of this worker
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # RAY: the GPU Ray assigned, or CPU
    torch.set_num_threads(max(1, math.ceil(member.resources.cpus_per_worker)))

    resume = None
    checkpoint = ray.train.get_checkpoint()  # RAY: latest checkpoint after a restart or re-run
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        if rank == 0:
            print(f"member {member.name}: resuming after epoch {resume['epoch']} from {checkpoint.path}", flush=True)

    data = open_member_data(Data.model_validate(config["data"]))
    run_id = config.get("mlflow_run_id")
    client = MlflowClient(config["tracking_uri"]) if rank == 0 and run_id else None

    def on_epoch_end(state, metrics, model, optimizer):
        final = state.epoch == member.recipe.epochs
        probs = _gather(predict(model, data.val, member, device, rank, world), world) if final else None
        if final:  # the member's own work in this process: data, model, epochs, predictions
            metrics["member_s"] = time.perf_counter() - started
        if client is not None:
            log_epoch(client, run_id, metrics, state.epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                net = model.module if hasattr(model, "module") else model
                save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), arch=member.arch, num_classes=data.num_classes,
                                low_res=member.low_res, model=net, optimizer=optimizer.state_dict(),
                                epoch=state.epoch, step=state.step, history=state.history, metrics=metrics)
                if final:
                    np.save(os.path.join(tmp, PREDICTIONS_FILE), assemble_predictions(probs, len(data.val)))
                    np.save(os.path.join(tmp, LABELS_FILE), split_labels(data.val))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)  # RAY: metrics to Tune, checkpoint to storage

    if resume and resume["epoch"] >= member.recipe.epochs:
        # Killed after its final checkpoint but before the job recorded it: hand the final
        # checkpoint (model, predictions) back as this run's result instead of retraining.
        with tempfile.TemporaryDirectory() as tmp:
            final = checkpoint.to_directory(tmp) if rank == 0 else None
            ray.train.report(resume["metrics"], checkpoint=ray.train.Checkpoint.from_directory(final) if final else None)
        return
    train_member(member, data, device=device, rank=rank, world=world, resume=resume,
                 prepare_model=ray.train.torch.prepare_model,  # RAY: DDP when world > 1
                 on_epoch_end=on_epoch_end)
