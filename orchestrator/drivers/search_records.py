"""The search's runs files: the chosen trials as members (their checkpoints and cached
predictions, nothing retrained), with the record of what chose them and on which rows."""
from __future__ import annotations

from orchestrator.config import EnsembleConfig, JobContext, ResolvedMember
from orchestrator.records.from_job import dataset_ref, minival_ref
from orchestrator.records.member import StoredMember, member_record
from orchestrator.records.runs_file import Choice, MlflowRef, RunsFile


def stored(row: dict, run_ids: dict[str, str], weight: float = 1.0) -> StoredMember:
    """A complete trial as a member record (records/member.py), named for its trial."""
    m: ResolvedMember = row["member"]
    return member_record(m, run_ids.get(row["trial_id"]), final={**row["metrics"], "epoch": row["epochs"]},
                         history=row["history"], name=f"{m.name}-{row['trial_id']}",
                         recipe=f"search:{row['trial_id']}", weight=weight, checkpoint=row["checkpoint"],
                         predictions=row["predictions"], minival_predictions=row.get("minival_predictions"),
                         labels=row["labels"], minival_labels=row.get("minival_labels"))


def runs_files(cfg: EnsembleConfig, rows: list[dict], choice: dict, ctx: JobContext, run_ids: dict) -> dict[str, RunsFile]:
    complete = [r for r in rows if r.get("predictions")]
    first = stored(complete[0], run_ids)
    dataset = dataset_ref(cfg, first.labels, int(first.metrics["val_samples"]))
    minival, choices = minival_ref(cfg, [stored(r, run_ids) for r in complete])
    sel = cfg.search.select
    if minival is not None:
        choices = [c.model_copy(update={"what": "per-epoch metrics and Tune's metric (ASHA/PBT ranked trials)"})
                   for c in choices]
        choices.append(Choice(what="the trials that became members", split=minival.split,
                              samples=minival.samples))
    else:
        # without a minival Tune ranked trials on all of val, and the members were chosen on
        # a seeded part of it: ensemble.evaluate reports only the rest
        choices = [Choice(what="Tune's metric (ASHA/PBT ranked trials)", split=dataset.split, samples=dataset.samples),
                   Choice(what="the trials that became members", split=dataset.split,
                          samples=choice["selection_rows"], fraction=sel.selection_fraction, seed=0)]
    mlflow = MlflowRef(tracking_uri=ctx.tracking_uri, experiment=cfg.mlflow.experiment,
                       parent_run_id=ctx.parent_run_id)
    return {kind: RunsFile(ensemble=f"{cfg.name}-{kind}", mlflow=mlflow, dataset=dataset, minival=minival,
                           choices=choices,
                           members=[stored(complete[i], run_ids, w).record()
                                    for i, w in zip(choice[kind]["chosen"], choice[kind]["weights"])])
            for kind in ("greedy", "topk")}
