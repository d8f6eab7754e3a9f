"""The search job's driver: check the space, run the Tune search, choose members, write
runs files, log the search to MLflow.

`jobs/search.py` only parses arguments and calls `run`. The search is tracked as one
MLflow parent run (tag ensemble.kind = search) with a child per trial; its output is a
runs file of the chosen trials (checkpoints and cached predictions reused, nothing
retrained), which `ensemble.evaluate` reads and an ensemble config can import
(`imported_runs:`).
"""
from __future__ import annotations

import os
import tempfile
import time

from orchestrator.views import plots
from models.cost import COST_KEYS
from orchestrator.base import storage
from orchestrator.config import EnsembleConfig, JobContext, ResolvedMember, Search, load_config, resolve_members
from orchestrator.drivers.ensemble_job import check_data, open_job
from orchestrator.base.errors import UserError
from orchestrator.records.runs_file import write_runs
from orchestrator.config import search_space as space
from orchestrator.drivers.search_choice import LazyArrays, compare
from orchestrator.drivers.search_records import runs_files
from orchestrator.runtime.search_trial import search_trial
from orchestrator.views.terminal import console as make_console
from orchestrator.train.member import (CHECKPOINT_FILE, LABELS_FILE, MINIVAL_LABELS_FILE, MINIVAL_PREDICTIONS_FILE,
                                       PREDICTIONS_FILE)

MUTABLE_PREFIXES = ("recipe.optimizer.lr", "recipe.augment.overrides.")  # PBT's default: LR and augmentation


def load_and_check(path: str) -> tuple[EnsembleConfig, list[ResolvedMember]]:
    cfg = load_config(path)
    if cfg.search is None:
        raise UserError(f"{path} has no `search:` section (see configs/search/ for examples)")
    cfg.data.root = storage.absolute(cfg.data.root)
    bases = resolve_members(cfg)
    for b in bases:
        if b.resources.workers != 1:
            raise UserError(f"member {b.name}: search trials run one worker each (a GPU or a share of one); "
                            f"set resources.workers: 1 and train data-parallel members with train_ensemble.py")
        space.check_space(cfg.search.space, b)
    _check_scheduler(cfg.search)
    check_data(cfg)
    return cfg, bases


def mutable_paths(search: Search) -> list[str]:
    if search.pbt.mutate is not None:
        return search.pbt.mutate
    return [p for p in search.space if p.startswith(MUTABLE_PREFIXES) and search.space[p].kind != "grid"]


def _check_scheduler(search: Search) -> None:
    if search.scheduler != "pbt":
        return
    if search.algorithm != "random":
        raise UserError("search.scheduler pbt samples its own population: use search.algorithm random")
    paths = mutable_paths(search)
    for p in paths:
        if p not in search.space:
            raise unknown_path(p, search)
        if search.space[p].kind == "grid":
            raise UserError(f"search.pbt.mutate: {p!r} is a grid dimension; PBT perturbs choice and range ones")
    if not paths:
        raise UserError("search.scheduler pbt needs something to perturb: search recipe.optimizer.lr or an "
                        "augmentation field, or list fields in search.pbt.mutate")


def unknown_path(p: str, search: Search) -> UserError:
    return UserError(f"search.pbt.mutate: {p!r} is not searched; searched fields: {', '.join(search.space)}")


def build_scheduler(search: Search, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=search.asha.grace_period,
                             reduction_factor=search.asha.reduction_factor)
    if search.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=search.pbt.perturbation_interval,
            hyperparam_mutations={p: space.to_tune(search.space[p]) for p in mutable_paths(search)},
            quantile_fraction=search.pbt.quantile_fraction, resample_probability=search.pbt.resample_probability,
            synch=True)  # synchronous: every trial reaches the interval before any exploits (reproducible)
    return FIFOScheduler()


def build_search_alg(search: Search):
    if search.algorithm == "random":
        return None  # Tune's BasicVariantGenerator: random sampling, grid dimensions expanded
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("search.algorithm optuna needs the optuna package (pip install optuna); "
                        "valid choices without it: random") from None
    return OptunaSearch()


def _resources(bases: dict[str, ResolvedMember]):
    """Each trial holds its base member's worker resources (fractional GPUs pack trials)."""
    from ray.tune import PlacementGroupFactory

    def per_trial(config: dict) -> PlacementGroupFactory:
        r = bases[config["base"]].resources
        return PlacementGroupFactory([{"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}])
    return per_trial


def run_search(cfg: EnsembleConfig, bases: list[ResolvedMember], ctx: JobContext, run_name: str):
    from ray import tune

    search = cfg.search
    by_key = {b.key: b for b in bases}
    epochs = max(b.recipe.epochs for b in bases)
    param_space = {"base": tune.grid_search(list(by_key)), **space.param_space(search.space)}
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), _resources(by_key))
    fs, path = storage.ray_storage(storage.join(ctx.storage, cfg.name, "search"))
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=tune_metric(cfg), mode="min", scheduler=build_scheduler(search, epochs),
                                    search_alg=build_search_alg(search), num_samples=search.num_samples,
                                    max_concurrent_trials=search.max_concurrent_trials),
        run_config=tune.RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                                  # stopping at the last epoch comes before the scheduler, so PBT never
                                  # "exploits" a finished trial (which would leave two copies of one model)
                                  stop={"training_iteration": epochs},
                                  failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                  # PBT clones donors' recent checkpoints: keep a few (Tune warns at <= 2)
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))
    return tuner.fit()


def tune_metric(cfg: EnsembleConfig) -> str:
    """`search.metric` on the held-out split: minival when the config has one (val is then
    never seen by ASHA, PBT or the choice of members), else val."""
    return cfg.search.metric.replace("val_", f"{cfg.data.heldout}_", 1)


FINAL = ("val_top1_err", "val_top5_err", "val_loss", "images_per_s", "val_samples", "params", *COST_KEYS)


def collect(results, bases: dict[str, ResolvedMember], root: str, heldout: str = "val") -> list[dict]:
    """One row per trial: its overrides, epochs trained, final metrics, history, and (when
    it trained every epoch) the URIs of its final checkpoint and predictions."""
    rows = []
    for r in results:
        if r.metrics is None or "epoch" not in r.metrics:
            continue
        base = bases[r.config["base"]]
        overrides = {k: v for k, v in r.config.items() if k != "base"}
        member = space.apply(base, overrides)
        hist = r.metrics_dataframe.sort_values("training_iteration") if r.metrics_dataframe is not None else None
        keys = ("epoch", f"{heldout}_top1_err", f"{heldout}_top5_err", f"{heldout}_loss", "train_loss", "epoch_minutes")
        history = [{k: row[k] for k in keys} for _, row in hist.iterrows()] if hist is not None else []
        own = r.metrics["trial_id"]
        donors = [d for d in (hist["restored_from"] if hist is not None and "restored_from" in hist else [])
                  if isinstance(d, str) and d and d != own]
        row = {"trial_id": own, "base": base.name, "member": member, "overrides": overrides,
               "epochs": int(r.metrics["epoch"]), "complete": int(r.metrics["epoch"]) >= member.recipe.epochs,
               # a trial stopped early never scored val (with a minival): nan
               "metrics": {k: float(r.metrics.get(k, float("nan")))
                           for k in dict.fromkeys(FINAL + (f"{heldout}_top1_err", f"{heldout}_top5_err"))},
               "history": history, "cloned_from": sorted(set(donors))}
        if row["complete"] and r.checkpoint is not None:
            uri = storage.checkpoint_uri(root, r.checkpoint.path)
            # the same final model reached through a clone is one candidate, not two
            if not any(other.get("checkpoint", "").startswith(uri + "/") for other in rows):
                row.update(checkpoint=storage.join(uri, CHECKPOINT_FILE), predictions=storage.join(uri, PREDICTIONS_FILE),
                           labels=storage.join(uri, LABELS_FILE))
                if heldout == "minival":
                    row.update(minival_predictions=storage.join(uri, MINIVAL_PREDICTIONS_FILE),
                               minival_labels=storage.join(uri, MINIVAL_LABELS_FILE))
        rows.append(row)
    return rows


def trial_run_ids(client, experiment_id: str, parent: str) -> dict[str, str]:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    return {r.data.tags.get("trial.id"): r.info.run_id for r in runs if r.data.tags.get("trial.id")}


def log_search(client, parent: str, cfg: EnsembleConfig, rows: list[dict], choice: dict | None) -> None:
    import csv

    from mlflow.entities import Metric

    keys = list(cfg.search.space)
    table = [{"trial": r["trial_id"], "base": r["base"], **r["overrides"], "epochs": r["epochs"], **r["metrics"]}
             for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "trials.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
        plots.plot_lr_policies(os.path.join(tmp, "lr_policies.png"))
        curve_metric = tune_metric(cfg).replace("_loss", "_top1_err")
        labels = {}
        for r in rows:  # each trial named by the values it trains with and its final error
            final = r["history"][-1].get(curve_metric) if r["history"] else None
            labels[r["trial_id"]] = plots.trial_label(r["trial_id"], space.in_effect(r["overrides"]), final)
        plots.plot_trials(os.path.join(tmp, "trial_curves.png"), {r["trial_id"]: r["history"] for r in rows},
                          curve_metric, labels)
        plots.plot_parallel(os.path.join(tmp, "parallel_coordinates.png"), table, keys, tune_metric(cfg))
        for name in ("trials.csv", "lr_policies.png", "trial_curves.png", "parallel_coordinates.png"):
            client.log_artifact(parent, os.path.join(tmp, name), "search")
    if choice:
        ts = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(f"{kind}_{k}", float(choice[kind][k]), ts, 0)
                                          for kind in ("greedy", "topk")
                                          for k in ("top1_err", "top5_err", "best_member_top1_err")])


def print_choice(console, rows: list[dict], choice: dict, size: int) -> None:
    from rich.table import Table

    complete = [r for r in rows if r.get("predictions")]
    table = Table(title=f"choosing up to {size} members from {len(complete)} complete trials "
                        f"(held-out rows: {choice['report_rows']})")
    for col in ("choice", "trials", "ensemble top-1 err", "ensemble top-5 err",
                f"best member (chosen on the {choice['selection_rows']} selection rows): top-1 err"):
        table.add_column(col)
    for kind, label in (("topk", "top-k by own error"), ("greedy", "Caruana selection")):
        c = choice[kind]
        table.add_row(label, ", ".join(complete[i]["trial_id"] for i in c["chosen"]), f"{c['top1_err']:.2%}",
                      f"{c['top5_err']:.2%}", f"{complete[c['best_member']]['trial_id']} {c['best_member_top1_err']:.2%}")
    console.print(table)


def run(cfg: EnsembleConfig, bases: list[ResolvedMember], config_path: str, runs_path: str) -> dict:
    console = make_console()
    tags = {"search.scheduler": cfg.search.scheduler}
    with open_job(cfg, config_path, "search", tags) as (root, tracking_uri, client, experiment_id, parent):
        ctx = JobContext(ensemble=cfg.name, storage=root, data=cfg.data, tracking_uri=tracking_uri,
                         experiment_id=experiment_id, parent_run_id=parent, members={b.key: b for b in bases})
        console.print(f"search [bold]{cfg.name}[/]: {cfg.search.scheduler}, {cfg.search.num_samples} samples x "
                      f"{len(bases)} base member(s); MLflow {tracking_uri} run {parent}")
        results = run_search(cfg, bases, ctx, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        rows = collect(results, {b.key: b for b in bases}, root, cfg.data.heldout)
        if not rows:
            client.set_terminated(parent, "FAILED")
            raise RuntimeError("no search trial reported a result")
        complete = [r for r in rows if r.get("predictions")]
        run_ids = trial_run_ids(client, experiment_id, parent)
        for r in rows:  # trials the scheduler stopped end their MLflow run too, marked as such
            if not r["complete"] and r["trial_id"] in run_ids:
                client.set_tag(run_ids[r["trial_id"]], "search.stopped_after_epoch", str(r["epochs"]))
                client.set_terminated(run_ids[r["trial_id"]], "KILLED")
        choice = None
        if complete:
            labels = storage.read_npy(complete[0]["labels"])
            preds = LazyArrays([r["predictions"] for r in complete], storage.read_npy)  # streamed
            sel = cfg.search.select
            held = None
            if cfg.data.minival:  # choose on the minival, report on all of val
                held = (LazyArrays([r["minival_predictions"] for r in complete], storage.read_npy),
                        storage.read_npy(complete[0]["minival_labels"]))
            costs = [r["metrics"]["macs"] for r in complete] if sel.budget_macs else None
            choice = compare(preds, labels, sel.size, sel.metric, sel.selection_fraction, selection=held,
                             cost=costs, budget=sel.budget_macs)
            files = runs_files(cfg, rows, choice, ctx, run_ids)
            write_runs(runs_path, files["greedy"])
            write_runs(storage.join(root, cfg.name, "runs.yaml"), files["greedy"])
            write_runs(storage.join(root, cfg.name, "runs-topk.yaml"), files["topk"])
            print_choice(console, rows, choice, sel.size)
        log_search(client, parent, cfg, rows, choice)
        client.set_terminated(parent, "FINISHED")
        stopped = sum(not r["complete"] for r in rows)
        cloned = sum(bool(r["cloned_from"]) for r in rows)
        console.print(f"{len(rows)} trials: {len(complete)} complete, {stopped} stopped early, {cloned} cloned by PBT")
        if complete:
            console.print(f"runs file (Caruana selection): {storage.join(root, cfg.name, 'runs.yaml')}; top-k choice: "
                          f"{storage.join(root, cfg.name, 'runs-topk.yaml')}")
        return {"rows": rows, "choice": choice, "parent_run_id": parent}
