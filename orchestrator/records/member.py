"""A member's record, made in one place for every path that produces one: a job's
trained member (finished or failed), a member that never finished, a search trial chosen
as a member.

`StoredMember` is what a finished member leaves in the job's storage
(`<storage>/<ensemble>/members/<key>.json`): its `MemberRecord` plus where its held-out
labels are, which the job's runs file takes once for the whole dataset. Records written
by earlier versions read back unchanged (tested from a stored fixture).
"""
from __future__ import annotations

from models import get_spec
from models.cost import COST_KEYS
from orchestrator.config import ResolvedMember
from orchestrator.records.runs_file import EvalRef, MemberRecord

# a member's final metrics -> the record's names (the held-out split is val)
RENAMED = {"val_top1_err": "top1_err", "val_top5_err": "top5_err"}
# what a record keeps of the final epoch's metrics, when present (bench/overhead_bench.py
# compares member_s with wall time; packing decides from gpu_memory_gb)
KEPT = ("val_top1_err", "val_top5_err", "val_loss", "images_per_s", "val_samples", "member_s", "params",
        "minival_top1_err", "minival_top5_err", "minival_loss", *COST_KEYS)


class StoredMember(MemberRecord):
    labels: str | None = None  # the held-out split's labels, as this member scored them
    minival_labels: str | None = None

    def record(self) -> MemberRecord:
        return MemberRecord(**self.model_dump(exclude={"labels", "minival_labels"}))


def record_metrics(final: dict, history: list[dict]) -> dict[str, float]:
    """A record's metrics from the final epoch's and the per-epoch history: every KEPT
    figure present, the epochs and minutes trained, peak GPU memory, compile time."""
    out = {RENAMED.get(k, k): float(final[k]) for k in KEPT if k in final and final[k] == final[k]}  # not NaN
    out["epochs"] = float(final["epoch"])
    out["minutes"] = sum(h.get("epoch_minutes", 0.0) for h in history)
    memory = [h["gpu_memory_gb"] for h in history if h.get("gpu_memory_gb")]
    if memory:
        out["gpu_memory_gb"] = max(memory)
    compile_s = [h["compile_s"] for h in history if "compile_s" in h]
    if compile_s:
        out["compile_s"] = sum(compile_s)  # one per process start: a resumed member paid it again
    return out


def member_record(member: ResolvedMember, run_id: str | None, *, final: dict | None = None,
                  history: list[dict] = (), name: str | None = None, recipe: str | None = None,
                  weight: float = 1.0, **fields) -> StoredMember:
    """The record of `member` (its MLflow run `run_id`); with `final`, its metrics; `fields`:
    status, error, and where its checkpoint, predictions and labels are."""
    ev = get_spec(member.arch).eval_transform(member.low_res, member.input_size)
    return StoredMember(name=name or member.name, key=member.key, arch=member.arch, eval=EvalRef(**ev.to_dict()),
                        low_res=member.low_res, weight=member.weight * weight, mlflow_run_id=run_id, seed=member.seed,
                        recipe=recipe or member.recipe_name,
                        metrics=record_metrics(final, history) if final is not None else {},
                        cost_machine=(final or {}).get("cost_machine"), role=member.role, **fields)
