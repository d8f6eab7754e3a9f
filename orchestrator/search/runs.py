"""The search's runs files: the chosen trials as members (their checkpoints and cached
predictions, nothing retrained), with the record of what chose them and on which rows."""
from __future__ import annotations

from models import get_spec
from orchestrator.config import EnsembleConfig, JobContext, ResolvedMember
from orchestrator.job_runs import dataset_ref, minival_ref
from orchestrator.runs_file import Choice, EvalRef, MemberRecord, MlflowRef, RunsFile


def member_record(row: dict, run_ids: dict[str, str], weight: float = 1.0) -> MemberRecord:
    m: ResolvedMember = row["member"]
    ev = get_spec(m.arch).eval_transform(m.low_res, m.input_size)
    minutes = sum(h.get("epoch_minutes", 0.0) for h in row["history"])
    return MemberRecord(
        name=f"{m.name}-{row['trial_id']}", key=m.key, arch=m.arch, checkpoint=row["checkpoint"],
        predictions=row["predictions"], minival_predictions=row.get("minival_predictions"), eval=EvalRef(**ev.to_dict()), low_res=m.low_res, weight=m.weight * weight,
        mlflow_run_id=run_ids.get(row["trial_id"]), seed=m.seed, recipe=f"search:{row['trial_id']}",
        metrics={"top1_err": row["metrics"]["val_top1_err"], "top5_err": row["metrics"]["val_top5_err"],
                 "val_loss": row["metrics"]["val_loss"], "images_per_s": row["metrics"]["images_per_s"],
                 "minutes": minutes, "epochs": row["epochs"], "val_samples": row["metrics"]["val_samples"]})


def runs_files(cfg: EnsembleConfig, rows: list[dict], choice: dict, ctx: JobContext, run_ids: dict) -> dict[str, RunsFile]:
    complete = [r for r in rows if r.get("predictions")]
    dataset = dataset_ref(cfg, complete[0]["labels"], int(complete[0]["metrics"]["val_samples"]))
    minival, choices = minival_ref(cfg, complete)
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
                           members=[member_record(complete[i], run_ids, w)
                                    for i, w in zip(choice[kind]["chosen"], choice[kind]["weights"])])
            for kind in ("greedy", "topk")}
