"""An evaluation's figures on the ensemble's MLflow parent run: `ensemble_*` metrics and
the report's files from `ensemble.evaluate`, `job_*` metrics and the result table from the
training job that ends with its ensemble."""
from __future__ import annotations

import os

from ensemble.views import report as rep
from orchestrator.records.runs_file import RunsFile


def mlflow_target(runs: RunsFile) -> tuple[str | None, str | None]:
    """(tracking URI, parent run) the evaluation logs to: the runs file's, else
    MLFLOW_TRACKING_URI's (read when called)."""
    uri = (runs.mlflow.tracking_uri if runs.mlflow else None) or os.environ.get("MLFLOW_TRACKING_URI")
    parent = runs.mlflow.parent_run_id if runs.mlflow else None
    return uri, parent


def log_to_mlflow(runs: RunsFile, report: dict, files: list[str]) -> str | None:
    from mlflow.tracking import MlflowClient

    uri, parent = mlflow_target(runs)
    if not uri or not parent:
        return None
    client = MlflowClient(uri)
    e = report["ensemble"]
    prefix = f"ensemble_{report['tta']['mode']}_" if report["tta"]["mode"] != "none" else "ensemble_"
    for key in ("top1_err", "top5_err", "nll", "ece", "oracle_top1_err", "gain_top5_over_best", "gain_top1_over_best"):
        client.log_metric(parent, prefix + key, float(e[key]))
    client.log_metric(parent, "best_member_top5_err", float(report["best_member"]["top5_err"]))
    for key, value in (e.get("cost") or {}).items():  # what the ensemble costs to run (ensemble/core/costs.py)
        client.log_metric(parent, f"{prefix}{key}", float(value))
    for point in report["size_curve"]:
        client.log_metric(parent, "size_curve_top5_err", point["top5_err"], step=point["k"])
    for path in files:
        client.log_artifact(parent, path, "ensemble_report")
    return parent


def log_job_result(runs: RunsFile, report: dict) -> str | None:
    """The job's result on its parent run: metrics named `job_*` (so a later
    `ensemble.evaluate --select ...` logging `ensemble_*` does not overwrite them), and the
    result table as the run's description (shown on the run's page in the MLflow UI).
    The ensemble's errors are also logged as `val_top1_err` / `val_top5_err`, the names
    of each member's final figures, so that the experiment's runs table sorted by either
    column ranks the ensemble among its members (`bench/ui_screenshots.py` opens it so)."""
    from mlflow.tracking import MlflowClient

    uri, parent = mlflow_target(runs)
    if not uri or not parent:
        return None
    client = MlflowClient(uri)
    e, members = report["ensemble"], {m["name"]: m for m in report["members"]}

    def log(key: str, value: float) -> None:  # 7 digits, as float32 figures hold: 0.662, not 0.66199999
        client.log_metric(parent, key, float(f"{float(value):.7g}"))

    for key, value in (e.get("cost") or {}).items():
        log(f"job_ensemble_{key}", value)
    for k in (1, 5):
        log(f"job_ensemble_top{k}_err", e[f"top{k}_err"])
        log(f"val_top{k}_err", e[f"top{k}_err"])
        log(f"job_best_member_top{k}_err", members[e[f"best_member_top{k}"]][f"top{k}_err"])
        log(f"job_gain_top{k}_points", 100 * e[f"gain_top{k}_over_best"])
    client.set_tag(parent, "mlflow.note.content", rep.markdown(report))
    return parent
