"""Train an ensemble: every member a Ray Tune trial, all tracked in MLflow.

    python jobs/train_ensemble.py                                   # embedded default, local
    python jobs/train_ensemble.py --config configs/smoke.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_ensemble.py --config configs/tiny-imagenet-20.yaml

Runs each member as one Tune trial (as many at once as the cluster allows; a
data-parallel member's trial runs a Ray Train TorchTrainer), writes a
member's record when it finishes, and ends with a table of the members and `runs.yaml`.
Running the same job again trains nothing that finished and resumes the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python jobs/train_ensemble.py` from a bare checkout

from orchestrator.base.errors import exit_on_user_error  # noqa: E402
from orchestrator.base.outages import exit_on_outage  # noqa: E402
from ensemble.core import distilled
from ensemble.core.evaluation import summarize
from ensemble.views.logged import log_job_result
from ensemble.views.report import headline
from orchestrator.drivers import ensemble_job
from orchestrator.views.tracking import run_page_url, runs_view_url

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="ensemble config YAML (default: %(default)s)")
    p.add_argument("--runs", default="runs.yaml", help="where to write the members list (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and data, print the members, stop")
    return p.parse_args(argv)


def show_result(runs, runs_path: str) -> None:
    """The number the job exists for: its ensemble against its best member, per metric."""
    report = summarize(runs_path).as_dict()
    e = report["ensemble"]
    print(f"\nensemble of {len(report['members'])} finished members (mean softmax) on "
          f"{report['dataset']['split']}, {report['dataset']['samples']} samples:")
    for line in headline(report):
        print(f"  {line}")
    parent = log_job_result(runs, report)
    if parent:
        print(f"  logged to the parent run as job_ensemble_top1_err = {e['top1_err']:.4f}, "
              f"job_ensemble_top5_err = {e['top5_err']:.4f}")
        runs_link, parent_link, serve = ui_links(runs.mlflow.tracking_uri, parent)
        print(f"  the members and the ensemble, ranked, in the MLflow UI: {runs_link}{serve}")
        print(f"  the ensemble's result table (the parent run): {parent_link}")


def show_distillation(runs) -> None:
    """The job's last lines: the student against its plain twin and the ensemble."""
    rows = distilled.compare(runs)
    if not rows:
        print("\ndistillation: the student or its twin did not finish; nothing to compare")
        return
    print(f"\ndistillation, on {runs.dataset.split} ({rows[0]['samples']} images; paired 95% bootstrap intervals):")
    for line in distilled.lines(rows):
        print(f"  {line}")
    distilled.log(runs, rows)


def ui_links(uri: str, parent: str) -> tuple[str, str, str]:
    """(the experiment's runs page on the job's saved view, the parent run's page, how to
    serve them): both in the model-training layout (orchestrator/views/tracking.py); for the
    embedded store, where `mlflow ui` serves them by default."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_run(parent).info.experiment_id
    remote = uri.startswith(("http://", "https://"))
    ui = uri if remote else "http://127.0.0.1:5000"
    serve = "" if remote else f" (after `mlflow ui --backend-store-uri {uri}`)"
    return runs_view_url(ui, experiment), run_page_url(ui, experiment, parent), serve


@exit_on_user_error
@exit_on_outage(lambda: "Kept: every finished member and the latest checkpoint of each running one, in the job's "
                        "storage; the same command resumes them.")
def main(argv=None) -> int:
    args = parse_args(argv)

    cfg, members = ensemble_job.load_and_check(args.config)
    if args.dry_run:
        ensemble_job.print_plan(cfg, members)
        return 0
    start = time.time()
    runs, failed = ensemble_job.run(cfg, members, args.config, args.runs)
    if any(m.status == "finished" and m.predictions for m in runs.members):
        show_result(runs, args.runs)
    where = args.runs if "://" in args.runs else os.path.abspath(args.runs)  # an s3:// URL stays one
    print(f"\nwrote {where} with {len(runs.members)} members "
          f"in {(time.time() - start) / 60:.1f} min")
    if cfg.distill is not None:
        show_distillation(runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
