"""The Ray Train layer: the per-worker function of a data-parallel member's `TorchTrainer`.

`member_worker.run_member` does the work; this file is its Ray Train session, with the
Ray touchpoints marked `# RAY:`: the worker's rank and device, resuming from the run's
latest checkpoint, DDP wrapping, and one `ray.train.report` per epoch carrying rank 0's
checkpoint (Ray uploads it to the run's storage, local or s3://).
"""
from __future__ import annotations

import os
import tempfile

import ray.train
import ray.train.torch
import torch

from orchestrator.runtime.member_worker import run_member
from orchestrator.train.member import CHECKPOINT_FILE

__all__ = ["train_loop_per_worker"]


class RayTrainSession:
    def __init__(self):
        ctx = ray.train.get_context()  # RAY: rank and world size of this worker
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # RAY: the GPU Ray assigned, or CPU
        self.prepare_model = ray.train.torch.prepare_model  # RAY: DDP when world > 1
        self._checkpoint = ray.train.get_checkpoint()  # RAY: latest checkpoint after a restart or re-run

    def resume(self) -> tuple[dict | None, str]:
        if not self._checkpoint:
            return None, ""
        with self._checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        return state, self._checkpoint.path

    def report(self, metrics: dict, folder: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=ckpt)  # RAY: metrics to Tune, checkpoint to storage

    report_may_stop = False

    def epoch_fields(self, model) -> tuple[dict, dict]:
        return {}, {}

    def report_final_again(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            final = self._checkpoint.to_directory(tmp) if self.rank == 0 else None
            self.report(state["metrics"], final)


def train_loop_per_worker(config: dict) -> None:
    run_member(config["work"], RayTrainSession())  # a MemberWork (orchestrator/config/contracts.py)
