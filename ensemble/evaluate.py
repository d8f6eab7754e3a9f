"""Evaluate an ensemble from its runs file: every member, the ensemble, the gain.

    python -m ensemble.evaluate --members runs.yaml
    python -m ensemble.evaluate --members s3://bucket/ens/runs.yaml --json report.json \
        --select greedy --calibrate --tta flip

Prints top-1/top-5 error (and NLL, ECE) of every member and of the ensemble with the gain
over the best member; writes a report folder (report.json, report.csv, size_curve.png,
members.png, reliability.png); logs metrics and plots to the ensemble's MLflow parent
run when the runs file names one (or MLFLOW_TRACKING_URI is set). Selection and
temperatures are fitted on a held-out part of the split, and the report is on the rest.

A thin command line over the library (`ensemble.core.evaluation.evaluate`, options in
`ensemble.core.options.EvaluateOptions`).
"""
from __future__ import annotations

import argparse

from pydantic import ValidationError

from ensemble.views import report as rep
from ensemble.core.evaluation import evaluate
from ensemble.views.logged import log_to_mlflow, mlflow_target
from ensemble.core.options import METHODS, EvaluateOptions
from ensemble.core.results import Report
from ensemble.core.serve import log_ensemble_model
from ensemble.core.tta import TTA_VIEWS
from orchestrator.base.errors import UserError, exit_on_user_error
from orchestrator.base.outages import check_tracking, exit_on_outage
from orchestrator.records.runs_file import RunsFile, load_runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--members", required=True, help="runs.yaml written by jobs/train_ensemble.py (path or URL)")
    p.add_argument("--out", default="ensemble-report", help="report folder (default: %(default)s)")
    p.add_argument("--json", help="also write the JSON report here")
    p.add_argument("--method", default="mean_softmax", choices=sorted(METHODS),
                   help="mean_softmax (default), weighted (weights from runs.yaml), geometric (= logit mean)")
    p.add_argument("--select", choices=["none", "greedy"], default="none",
                   help="greedy: Caruana ensemble selection with replacement on the selection split")
    p.add_argument("--select-rounds", type=int, default=None, help="greedy steps (default: 2 x members)")
    p.add_argument("--select-metric", choices=["nll", "top1", "top5"], default="nll")
    p.add_argument("--calibrate", action="store_true", help="per-member temperature scaling on the selection split")
    p.add_argument("--selection-fraction", type=float, default=0.5,
                   help="part of the split held out for selection/calibration when used (default: %(default)s)")
    p.add_argument("--tta", choices=sorted(TTA_VIEWS), default="none",
                   help="per-member test-time augmentation (recomputes predictions from checkpoints)")
    p.add_argument("--random-orders", type=int, default=3, help="random orders averaged in the size curve")
    p.add_argument("--curve-samples", type=int, default=10_000,
                   help="rows the size curve is scored on (a seeded subset; default: %(default)s)")
    p.add_argument("--recompute", action="store_true", help="ignore cached predictions, run the checkpoints")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the MLflow parent run")
    p.add_argument("--log-model", action="store_true",
                   help="also log the ensemble as one MLflow pyfunc model (members, transforms, weights)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default: %(default)s)")
    p.add_argument("--budget-macs", type=float, default=None,
                   help="with --select greedy: keep the ensemble within this many multiply-adds per image")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="with --select greedy: within this many ms per image at batch 1 (the members' stored cost)")
    p.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="NAME[,NAME...]",
                   help="only these members, e.g. a distilled student alone (with --log-model: served alone)")
    p.add_argument("--with-students", action="store_true",
                   help="also take members with a role (distilled students, plain twins) into the ensemble")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def options_of(args: argparse.Namespace) -> EvaluateOptions:
    flags = {k: v for k, v in vars(args).items() if k in EvaluateOptions.model_fields}
    try:
        return EvaluateOptions(**flags, log_mlflow=not args.no_mlflow)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") if err["loc"] else "options"
        raise UserError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


def publish(runs: RunsFile, report: Report, options: EvaluateOptions, out: str, json_path: str | None = None) -> None:
    """The report printed, written to `out` (and `json_path`), and logged as `options` say."""
    rep.print_table(report.as_dict())
    files = rep.write_folder(out, report.as_dict(), report.reliability)
    if json_path:
        rep.write_json(json_path, report.as_dict())
    print(f"report: {out}/ ({', '.join(f.rsplit('/', 1)[-1] for f in files)})")
    if not options.log_mlflow:
        return
    run = log_to_mlflow(runs, report.as_dict(), files)
    if run:
        print(f"logged to MLflow run {run}")
    if run and options.log_model:
        records = [m for m in runs.members if m.name in {r.name for r in report.members}]
        sel = report.selection or {}
        weights = [sel["weights"][r.name] for r in records] if sel.get("weights") else \
            [r.weight if options.method == "weighted" else 1.0 for r in records]
        uri = log_ensemble_model(runs, records, weights, run, mlflow_target(runs)[0], method=options.combination,
                                 temperatures=sel.get("temperatures"), tta=options.tta)
        print(f"ensemble model: {uri}  (mlflow.pyfunc.load_model(uri).predict(images))")


@exit_on_user_error
@exit_on_outage(lambda: "Kept: the report folder (--out), written before logging.")
def main(argv=None) -> int:
    args = parse_args(argv)
    options = options_of(args)
    runs = load_runs(args.members)
    tracking_uri, parent = mlflow_target(runs)
    if options.log_mlflow and parent:  # it will log: the server must answer before any work
        check_tracking(tracking_uri)
    publish(runs, evaluate(runs, options), options, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
