"""Single-worker members trained inside their own Tune trial process.

A member with `resources.workers: 1` needs no worker group, so its Tune trial trains it
itself (as search trials do) instead of starting a Ray Train controller and a worker
process per member. With Tune's `reuse_actors`, a trial process that finished one member
takes the next one with the same resource request, so torch, MLflow and the plotting
stack are imported once per concurrent slot, not once per member (bench/overhead_bench.py
measures the difference). Data-parallel members (workers > 1) still get a TorchTrainer.

Checkpoints keep Ray Train's guarantees, on the job's storage (local or s3://):

    <member dir>/train/<key>/epoch_0003/   model.pt (+ predictions.npy, labels.npy at the end)
    <member dir>/train/<key>/latest.json   {"epoch": 3, "uri": ".../epoch_0003"}

The pointer is written only after a checkpoint's upload has completed (one object PUT is
atomic on S3), and the previous checkpoint is deleted only after that, so a process killed
at any moment leaves a complete latest checkpoint. A restarted trial (Tune's
FailureConfig, after the process or its node died) and a re-run of the job both resume
from it. An exception inside training is retried from the latest checkpoint up to
`ray.max_failures` times, as Ray Train's FailureConfig does for worker groups, except
errors that would recur (a diverging loss, too many bad images, bad input).
"""
from __future__ import annotations

import os
import tempfile

import torch
from ray import tune

from orchestrator.base import storage
from orchestrator.config import MemberWork, ResolvedMember
from orchestrator.data.dataset import TooManyBadImages
from orchestrator.base.errors import UserError
from orchestrator.runtime.member_worker import run_member
from orchestrator.train.member import CHECKPOINT_FILE
from orchestrator.train.loop import NonFiniteLoss

POINTER = "latest.json"
# the same again on a retry: fail the member at once
DETERMINISTIC = (UserError, NonFiniteLoss, TooManyBadImages)


def eligible(member: ResolvedMember) -> bool:
    """Trained in its trial process: a single-worker member."""
    return member.resources.trial_cpus == 0


class TrialSession:
    """A member_worker.Session for one process, rank 0 of 1, checkpointing to `root`."""

    def __init__(self, member: ResolvedMember, root: str, progress=tune.report):
        use_gpu = member.resources.use_gpu and torch.cuda.is_available()  # Tune set CUDA_VISIBLE_DEVICES
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.prepare_model = lambda model: model.to(self.device)
        self.root, self.progress = root, progress
        self._latest: dict | None = None  # the pointer as this process last read or wrote it

    def latest(self) -> dict | None:
        if self._latest is None:  # only this process writes it: one read per member, not per epoch
            self._latest = storage.read_json(storage.join(self.root, POINTER))
        return self._latest

    def resume(self) -> tuple[dict | None, str]:
        self._latest = None  # a retry or a restart: read what is in storage now
        latest = self.latest()
        if latest is None:
            return None, ""
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.local_dir(latest["uri"], tmp)
            state = torch.load(os.path.join(local, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        return state, latest["uri"]

    def report(self, metrics: dict, folder: str | None) -> None:
        epoch = int(metrics["epoch"])
        uri = storage.join(self.root, f"epoch_{epoch:04d}")
        previous = self.latest()
        storage.put_dir(folder, uri)
        pointer = {"epoch": epoch, "uri": uri, "metrics": metrics}
        storage.write_json(storage.join(self.root, POINTER), pointer)
        self._latest = pointer
        if previous and previous["uri"] != uri:
            storage.remove(previous["uri"])
        self.progress({k: v for k, v in metrics.items() if isinstance(v, (int, float))})  # TUNE: progress

    report_may_stop = False

    def epoch_fields(self, model) -> tuple[dict, dict]:
        return {}, {}

    def report_final_again(self, state: dict) -> None:
        """Nothing to hand back: the final checkpoint already is the latest one."""


def run_here(work: MemberWork, checkpoints: str, max_failures: int, progress=tune.report) -> tuple[dict, str]:
    """Train `work`'s member in this process, as a Ray Train worker would
    (member_worker.run_member); returns (its final metrics, its final checkpoint's URI)."""
    member = work.member
    session = TrialSession(member, checkpoints, progress)
    for attempt in range(max_failures + 1):
        try:
            run_member(work, session)
            break
        except Exception as exc:
            if attempt == max_failures or isinstance(exc, DETERMINISTIC):
                raise
            print(f"member {member.name}: {type(exc).__name__}: {exc}; retrying from its latest checkpoint "
                  f"({attempt + 1}/{max_failures})", flush=True)
    latest = session.latest()
    return latest["metrics"], latest["uri"]
