"""Members whose data has moved keep their records.

A member's key hashes its data section, the data root included, so a job re-run after its
data moved (another machine, another mount) would compute new keys and retrain members it
already has. The job's stored runs file (`<storage>/<ensemble>/runs.yaml`, written at every
job end) records the roots it trained on; a member with no record under its key that has
one under the key it had with such a root keeps that key, its record and its checkpoints.
"""
from __future__ import annotations

from orchestrator.base import storage
from orchestrator.base.errors import UserError
from orchestrator.config import EnsembleConfig, JobContext, ResolvedMember, resolve_members
from orchestrator.records.runs_file import load_runs


def recorded_roots(job_dir: str) -> list[str]:
    """The data roots the job's stored runs file names (none when the job never finished)."""
    try:
        runs = load_runs(storage.join(job_dir, "runs.yaml"))
    except UserError:  # none (the job never finished) or one that cannot be read: nothing to recover
        return []
    return list(dict.fromkeys(ref.uri for ref in (runs.dataset, runs.minival) if ref is not None))


def has_record(ctx: JobContext, key: str) -> bool:
    """A finished member's record or an in-progress checkpoint under `key`."""
    return bool(storage.read_json(ctx.record_uri(key))
                or storage.read_json(storage.join(ctx.training_uri(key), "latest.json")))


def keys_after_a_move(cfg: EnsembleConfig, members: list[ResolvedMember],
                      ctx: JobContext) -> tuple[list[ResolvedMember], list[str]]:
    """`members` with each key that has no record replaced by its key under a recorded
    root where that one has a record; and a line per member kept, for the job to print."""
    out, lines = list(members), []
    for root in recorded_roots(ctx.member_dir):
        if root == cfg.data.root:
            continue
        before = resolve_members(cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root})}))
        for i, (now, then) in enumerate(zip(out, before)):
            if now.key == members[i].key and not has_record(ctx, now.key) and has_record(ctx, then.key):
                out[i] = now.model_copy(update={"key": then.key})
                lines.append(f"{now.name}: kept its record {then.key} (trained on {root}, now {cfg.data.root})")
    return out, lines
