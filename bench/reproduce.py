"""The ILSVRC lesson, reproduced by the platform: an ensemble of diverse members cuts top-1
and top-5 error below its best member, on real data, with a command anyone can rerun.

    python bench/reproduce.py --cpu            # this 2-CPU machine (configs/reproduce/cpu.yaml)
    python bench/reproduce.py --gpu            # one H100/H200 (configs/reproduce/gpu.yaml)
    python bench/reproduce.py --config C.yaml  # any ensemble config

Members are trained by the platform's Ray-free core (`orchestrator.train.member.train_member`,
the function the Ray member workers call, with the same final outputs), several at once in
separate processes: one per CPU core, or on one GPU as the packing planner decides: each
member with `gpus_per_worker: auto` is first probed alone on the GPU (a few steps of the
training core on a synthetic batch: peak memory and images/s), then
`orchestrator.planning.plan.apply_packing` gives it its share 1/K from those figures and the GPU's
memory, as `plan --measured` does for a cluster, and members start as the running ones'
shares leave room (`--pack K` overrides: K at once). Their val and minival predictions and
`runs.yaml` go to `--out`; `ensemble.evaluate` then scores the ensemble on that runs file
(bootstrap intervals, size curve; the best member chosen on the minival, reported on val).
A plain-PyTorch baseline (`bench/plain_baseline.py`, no platform code) trains in the same
run like for like with one member, the first whose network it writes (ResNet-20 on the
CPU config, ResNet-18 on the GPU one): that member's recipe and exact training images,
the same val images and scoring rule; its line names the member and both figures.
Neither Ray nor MLflow is needed.
A member whose folder holds its `record.json` (written last) is reused by a later run of
the same config, as the jobs reuse finished members; delete `--out` to train afresh.

The last line is the figure:
    ensemble top1 T1 top5 T5 best-member top5 B cut X% [lo, hi]
(errors as fractions on val; B is the val top-5 error of the member the minival chose; the
cut is the ensemble's top-5 error below B, relative to B, with the 95% paired bootstrap
interval).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = {"cpu": ROOT / "configs" / "reproduce" / "cpu.yaml", "gpu": ROOT / "configs" / "reproduce" / "gpu.yaml"}


def train_one(job: dict) -> dict:
    """Train one member in this (spawned) process; write its checkpoint and predictions
    under job['out']; return its runs-file record (with `labels`)."""
    import numpy as np
    import torch

    from models import save_checkpoint
    from orchestrator.config import Data, ResolvedMember
    from orchestrator.records.member import member_record
    from orchestrator.train.member import (CHECKPOINT_FILE, LABELS_FILE, MINIVAL_LABELS_FILE, MINIVAL_PREDICTIONS_FILE,
                                           PREDICTIONS_FILE, final_outputs, open_member_data, train_member)

    member = ResolvedMember.model_validate(job["member"])
    folder = os.path.join(job["out"], "members", member.key)
    done = os.path.join(folder, "record.json")
    if os.path.exists(done):  # trained by an earlier run of the same config: reused, as the jobs do
        with open(done) as f:
            return {**json.load(f), "reused": True}
    torch.set_num_threads(job["threads"])
    data = open_member_data(Data.model_validate(job["data"]), member.share)
    device = torch.device(job["device"])
    last: dict = {}

    def on_epoch_end(state, metrics, model, optimizer, probs):
        last.update(metrics=dict(metrics), probs=probs)
        err = metrics.get("val_top1_err", metrics.get("minival_top1_err", float("nan")))
        print(f"  {member.name}: epoch {state.epoch}/{member.recipe.epochs}, held-out top-1 {err:.1%}, "
              f"{metrics['images_per_s']:.0f} images/s", flush=True)

    model, state = train_member(member, data, device=device, on_epoch_end=on_epoch_end)
    metrics = last["metrics"]
    files = final_outputs(last["probs"], lambda part: [part], model, member, data, metrics, device)
    os.makedirs(folder, exist_ok=True)
    for name, array in files.items():
        np.save(os.path.join(folder, name), array)
    save_checkpoint(os.path.join(folder, CHECKPOINT_FILE), arch=member.arch, num_classes=data.num_classes,
                    low_res=member.low_res, model=model, epoch=state.epoch)
    minival = ({"minival_predictions": os.path.join(folder, MINIVAL_PREDICTIONS_FILE),
                "minival_labels": os.path.join(folder, MINIVAL_LABELS_FILE)} if MINIVAL_PREDICTIONS_FILE in files else {})
    record = member_record(member, None, final={**metrics, "epoch": state.epoch}, history=state.history,
                           status="finished", checkpoint=os.path.join(folder, CHECKPOINT_FILE),
                           predictions=os.path.join(folder, PREDICTIONS_FILE), labels=os.path.join(folder, LABELS_FILE),
                           **minival).model_dump()
    with open(done + ".partial", "w") as f:
        json.dump(record, f)
    os.replace(done + ".partial", done)  # written last: a member with a record is complete
    return record


def train_and_release(job: dict) -> dict:
    """train_one, then the process's cached GPU memory handed back (the process trains the
    next member, and the members packed beside it were planned without this one's cache)."""
    import gc

    import torch

    record = train_one(job)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def probe(jobs: list[dict], steps: int = 6) -> list[dict]:
    """Each member alone on the device: `steps` optimiser steps of the training core
    (`loop.train_epoch`, with the member's network, optimiser, batch, bf16 and channels_last)
    on a synthetic batch, after two warm-up steps. Peak memory (GB) and images/s: what the
    packing planner decides from. Members of the same shape are probed once."""
    import torch

    from models import build_model
    from orchestrator.config import ResolvedMember
    from orchestrator.train import loop
    from orchestrator.train.optim import build_optimizer

    seen: dict[tuple, dict] = {}
    out = []
    for job in jobs:
        m = ResolvedMember.model_validate(job["member"])
        r = m.recipe
        shape = (m.arch, m.low_res, m.input_size, r.batch_size, r.optimizer.name, r.bf16, r.channels_last)
        if shape not in seen:
            device = torch.device(job["device"])
            cuda = device.type == "cuda"
            cl = r.channels_last and cuda
            model = build_model(m.arch, num_classes=job["classes"], low_res=m.low_res).to(device)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            optimizer = build_optimizer(model, r.optimizer, r.optimizer.lr)
            images = torch.randn(r.batch_size, 3, m.input_size, m.input_size, device=device)
            labels = torch.randint(0, job["classes"], (r.batch_size,), device=device)
            batches = iter(lambda: (images, labels), None)
            state, criterion = loop.FitState(), loop.build_criterion(0.0)

            def run(n):
                return loop.train_epoch(model, optimizer, batches, n, lambda _: 1e-3, state, device, criterion,
                                        bf16=r.bf16, channels_last=cl)

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            run(2)  # cuDNN's autotuning and the allocator's first blocks
            metrics = run(steps)
            seen[shape] = {"images_per_s": metrics["images_per_s"], "gpu_memory_gb": metrics.get("gpu_memory_gb")}
            del model, optimizer, images, labels, batches
            if cuda:
                torch.cuda.empty_cache()
        out.append({"name": m.name, **seen[shape]})
    return out


def planned_shares(cfg, members, probes: list[dict], gpu_memory_gb: float, classes: int,
                   cpus: int) -> tuple[list[float], dict[str, str]]:
    """Each member's share of the one GPU as the packing planner decides it
    (`orchestrator.planning.plan.apply_packing`, the function `plan --measured` uses) from the probed
    memory and solo rate and this GPU's memory; a member with a fixed `gpus_per_worker`
    keeps it. Returns the shares and the planner's reason per packed member."""
    from orchestrator.planning.cluster import Cluster, NodeType
    from orchestrator.planning.plan import apply_packing

    gpu = Cluster(name="this GPU", nodes=[NodeType(name="gpu", count=1, cpus=cpus, gpus=1,
                                                   gpu_memory_gb=gpu_memory_gb)])
    rates = {p["name"]: p["images_per_s"] for p in probes}
    memory = {p["name"]: p["gpu_memory_gb"] for p in probes if p["gpu_memory_gb"]}
    packed, reasons = apply_packing(members, cfg.packing, gpu, classes, rates, memory)
    return [min(1.0, float(m.resources.gpus_per_worker)) for m in packed], reasons


def run_packed(pool, tasks: list[tuple], shares: list[float]) -> list:
    """fn(*args) for every (fn, *args) task, in order, each started once the running tasks'
    shares leave room for its own (shares of one device; 1 = alone). Results in order."""
    results: list = [None] * len(tasks)
    running: dict = {}
    used, nxt = 0.0, 0
    while nxt < len(tasks) or running:
        while nxt < len(tasks) and (not running or used + shares[nxt] <= 1 + 1e-6):
            running[pool.submit(*tasks[nxt])] = nxt
            used += shares[nxt]
            nxt += 1
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            i = running.pop(future)
            used -= shares[i]
            results[i] = future.result()
    return results


def trained_per_class(cfg) -> list[int]:
    """Images each of the first classes trains on: `data.train_per_class` (or all, by the
    manifest's labels file, else its mean per class) less the minival carved from them,
    and with `data.shares` one member's share of that."""
    import numpy as np

    from orchestrator.data.manifest import load_manifest

    n, d = num_classes(cfg), cfg.data
    if d.train_per_class:
        counts = [d.train_per_class] * n
    else:
        manifest = load_manifest(d.root)
        labels = manifest.split_labels("train")
        if labels is not None:
            counts = np.bincount(labels, minlength=n)[:n].tolist()
        else:  # no labels file: the split's mean per class
            counts = [sum(s.samples for s in manifest.shards("train")) // manifest.num_classes] * n
    return [int(d.member_per_class(c)) for c in counts]


PLAIN_ARCHS = ("resnet20", "resnet18", "resnet34")  # the networks bench/plain_baseline.py writes
PLAIN_AUGMENT = ("crop_scale", "crop_ratio", "hflip", "label_smoothing")  # the fields it applies


def baseline_member(members):
    """The member the plain baseline is compared with: the first, in the config's order,
    whose network the baseline writes (a fixed rule: nothing is chosen on val)."""
    return next((m for m in members if m.arch in PLAIN_ARCHS), None)


def unplain(member) -> list[str]:
    """What in the member's recipe has no plain counterpart (the baseline is then skipped)."""
    from orchestrator.train.augment import AugmentFields

    r, f, default = member.recipe, member.recipe.augment.fields(), AugmentFields()
    out = [f"augment.{k}" for k in vars(f) if k not in PLAIN_AUGMENT and getattr(f, k) != getattr(default, k)]
    out += [k for k in ("label_shuffling", "cam_crops", "confusion_prior", "multiscale", "max_steps_per_epoch")
            if getattr(r, k)]
    if r.schedule.policy not in ("constant", "cosine", "onecycle"):
        out.append(f"schedule.policy {r.schedule.policy}")
    return out


def baseline_spec(cfg, member) -> dict:
    """The member's recipe, eval transform and exact image keys (its share of train less the
    minival, and val), as bench/plain_baseline.py reads them."""
    from models import get_spec
    from orchestrator.train.member import open_member_data

    data = open_member_data(cfg.data, member.share)
    r, f = member.recipe, member.recipe.augment.fields()
    ev = get_spec(member.arch).eval_transform(member.low_res, member.input_size)
    return {"name": member.name, "arch": member.arch, "low_res": member.low_res, "input_size": member.input_size,
            "seed": member.seed, "classes": list(data.train.kept),
            "train_keys": [s.key for s in data.train.iter_samples()], "val_keys": [s.key for s in data.val.iter_samples()],
            "recipe": {"epochs": r.epochs, "batch_size": r.batch_size, "optimizer": r.optimizer.model_dump(mode="json"),
                       "schedule": r.schedule.model_dump(mode="json"), "plain_last_epochs": r.plain_last_epochs,
                       "bf16": r.bf16,
                       "augment": {k: getattr(f, k) for k in PLAIN_AUGMENT}},
            "eval": {"resize": ev.resize, "crop": ev.crop, "mean": list(ev.mean), "std": list(ev.std)}}


def plain_baseline(cfg, member, out: str, threads: int, device: str) -> dict:
    """bench/plain_baseline.py in its own process, like for like with `member`: its recipe,
    its training images, the same val images and scoring rule."""
    path = os.path.join(out, "baseline_member.json")
    with open(path, "w") as f:
        json.dump(baseline_spec(cfg, member), f)
    cmd = [sys.executable, str(ROOT / "bench" / "plain_baseline.py"), "--root", cfg.data.root, "--member", path,
           "--threads", str(threads), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def num_classes(cfg) -> int:
    from orchestrator.data.manifest import load_manifest

    classes = cfg.data.classes
    return len(classes) if isinstance(classes, list) else classes or load_manifest(cfg.data.root).num_classes


def gpu_estimate(cfg, members) -> str:
    """The planner's rate model (orchestrator/planning/cluster.py, fitted on one H200): seconds of
    the GPU alone for every member back to back; packing K at once lowers it."""
    from orchestrator.planning.cluster import Cluster, NodeType, estimated_rate

    n = num_classes(cfg)
    samples = sum(trained_per_class(cfg))  # a minival is scored, not trained on
    one = Cluster(name="one H200", nodes=[NodeType(name="gpu", count=1, cpus=16, gpus=1)])
    seconds = [m.recipe.epochs * samples / estimated_rate(m, one, n) for m in members]
    return (f"the planner's estimate for one H200: {sum(seconds):.0f} s of GPU time with the members back to back "
            f"(largest {max(seconds):.0f} s), before packing")


def write_runs_file(cfg, records: list[dict], path: str) -> None:
    from orchestrator.records.from_job import runs_file
    from orchestrator.records.member import StoredMember
    from orchestrator.records.runs_file import write_runs

    write_runs(path, runs_file(cfg, [StoredMember.model_validate(r) for r in records]))


def evaluate(runs: str, out: str, tta: str = "none") -> dict:
    """The evaluation library on the runs file (ensemble/core/evaluation.py), its report printed
    and written to out/report as the CLI writes it."""
    from ensemble.evaluate import publish
    from ensemble.core.evaluation import evaluate as evaluate_runs
    from ensemble.core.options import EvaluateOptions
    from orchestrator.records.runs_file import load_runs

    options = EvaluateOptions(random_orders=20, tta=tta, log_mlflow=False)
    report = evaluate_runs(load_runs(runs), options)
    publish(load_runs(runs), report, options, os.path.join(out, "report"), os.path.join(out, "report.json"))
    return report.as_dict()


def size_curve_line(report: dict) -> str:
    """Mean-over-random-orders error by ensemble size, and where it stops falling."""
    curve = report["size_curve"]
    top1 = [c["random_top1_err"] for c in curve]
    best_k = 1 + min(range(len(top1)), key=lambda i: (round(top1[i], 6), -i))
    points = ", ".join(f"{c['k']}: {c['random_top1_err']:.3f}/{c['random_top5_err']:.3f}" for c in curve)
    return f"size curve (top-1/top-5 err, mean of random orders) {points}; lowest top-1 at {best_k} members"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--cpu", action="store_true", help="this machine's size (configs/reproduce/cpu.yaml)")
    size.add_argument("--gpu", action="store_true", help="one GPU's size (configs/reproduce/gpu.yaml)")
    size.add_argument("--config", help="an ensemble config")
    p.add_argument("--out", default="outputs/reproduce", help="members, runs.yaml and the report (default %(default)s)")
    p.add_argument("--pack", type=int, help="members trained at once (default: CPU cores; on a GPU, the packing planner's K)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-PyTorch baseline")
    p.add_argument("--epochs", type=int, help="a quick look: every recipe trains this many epochs")
    p.add_argument("--members", type=int, help="a quick look: only the first N members")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="members scored with test-time flips (the reference's protocol), recomputed from checkpoints")
    args = p.parse_args()

    import torch

    from orchestrator.config import load_config, resolve_members

    path = args.config or str(SIZES["gpu" if args.gpu else "cpu"])
    cfg = load_config(path)
    if args.epochs:
        cfg = cfg.model_copy(update={"recipes": {k: r.model_copy(update={"epochs": args.epochs})
                                                 for k, r in cfg.recipes.items()}})
    members = resolve_members(cfg)[:args.members]
    gpu = args.gpu or any(m.resources.use_gpu for m in members)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    cores = os.cpu_count() or 1
    os.makedirs(args.out, exist_ok=True)
    print(f"{cfg.name}: {len(members)} members on {device}; data {cfg.data.root} "
          f"({cfg.data.classes} classes, {cfg.data.train_per_class} train per class)", flush=True)
    if device == "cuda":
        print(gpu_estimate(cfg, members), flush=True)
    start = time.time()
    jobs = [{"member": m.model_dump(), "data": cfg.data.model_dump(), "out": os.path.abspath(args.out),
             "device": device} for m in members]
    ctx = mp.get_context("spawn")
    shares = [1 / (args.pack or cores)] * len(members)
    if device == "cuda" and not args.pack:
        n = num_classes(cfg)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as one:  # its CUDA context ends with it
            probes = one.submit(probe, [{**j, "classes": n} for j in jobs]).result()
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
        shares, reasons = planned_shares(cfg, members, probes, memory, n, cores)
        for p in probes:
            print(f"  probe {p['name']}: {p['gpu_memory_gb'] or 0:.1f} GB, {p['images_per_s']:.0f} images/s alone; "
                  f"packing {reasons.get(p['name'], 'a fixed share')}", flush=True)
    pack = max(round(1 / s) for s in shares)
    threads = max(1, cores // pack) if device == "cpu" else 2
    jobs = [{**j, "threads": threads} for j in jobs]
    print(f"at most {pack} members at once ({threads} CPU threads each)", flush=True)
    tasks = [(train_and_release, j) for j in jobs]
    twin = None if args.no_baseline else baseline_member(members)
    if twin is not None and unplain(twin):
        print(f"plain baseline skipped: member {twin.name}'s recipe uses {', '.join(unplain(twin))}, which "
              f"bench/plain_baseline.py does not apply", flush=True)
        twin = None
    if twin is not None:  # first, holding one member's place: on a CPU a core, on a GPU the smallest share
        tasks.insert(0, (plain_baseline, cfg, twin, os.path.abspath(args.out), threads, device))
        shares = [min(shares)] + shares
    with ProcessPoolExecutor(max_workers=pack, mp_context=ctx) as pool:
        results = run_packed(pool, tasks, shares)
    baseline = results.pop(0) if twin is not None else None
    records = results
    trained_min = (time.time() - start) / 60
    reused = sum(bool(r.pop("reused", False)) for r in records)
    runs = os.path.join(args.out, "runs.yaml")
    write_runs_file(cfg, records, runs)
    report = evaluate(runs, args.out, args.tta)
    wall = (time.time() - start) / 60
    print(size_curve_line(report))
    for line in final_lines(report, records, baseline, twin):
        print(line)
    again = f" ({reused} of {len(records)} members reused from an earlier run in {args.out})" if reused else ""
    print(f"members trained in {trained_min:.1f} min{again}; whole run {wall:.1f} min on {device}")
    print(figure_line(report))


def best_of(report: dict, k: int) -> dict:
    """The report's best member on top-k: chosen on the minival when the runs file has one
    (ensemble/evaluate.py: choose_best), reported on val."""
    return next(m for m in report["members"] if m["name"] == report["ensemble"][f"best_member_top{k}"])


def final_lines(report: dict, records: list[dict], baseline: dict | None, twin) -> list[str]:
    ens, chosen = report["ensemble"], report["best_member"]["chosen_on"]
    b1, b5 = best_of(report, 1), best_of(report, 5)
    lines = [f"best member (chosen on {chosen}): top-1 {b1['name']} {b1['top1_err']:.4f}, "
             f"top-5 {b5['name']} {b5['top5_err']:.4f} on val",
             f"top-1 gain over the best member {ens['gain_top1_over_best']:+.4f} "
             f"[{ens['gain_top1_over_best_ci'][0]:+.4f}, {ens['gain_top1_over_best_ci'][1]:+.4f}]; "
             f"top-5 gain {ens['gain_top5_over_best']:+.4f} [{ens['gain_top5_over_best_ci'][0]:+.4f}, "
             f"{ens['gain_top5_over_best_ci'][1]:+.4f}] (95% paired bootstrap)"]
    if baseline:
        mine = next(r for r in records if r["name"] == twin.name)["metrics"]
        lines.append(f"plain PyTorch {twin.arch}, like for like with member {twin.name} (its recipe, its "
                     f"{baseline['train_images']} training images, the same {baseline['val_images']} val images, "
                     f"ties as misses): top-1 {baseline['top1_err']:.4f}, top-5 {baseline['top5_err']:.4f}; "
                     f"the member: top-1 {mine['top1_err']:.4f}, top-5 {mine['top5_err']:.4f}")
    return lines


def figure_line(report: dict) -> str:
    """ensemble top1 T1 top5 T5 best-member top5 B cut X% [lo, hi]: B is the best member's
    val top-5 error (chosen on the minival when there is one); the cut is B - T5 relative
    to B, with the gain's 95% paired bootstrap interval relative to B."""
    ens = report["ensemble"]
    best5 = best_of(report, 5)["top5_err"]
    lo, hi = ens["gain_top5_over_best_ci"]
    rel = (lambda x: f"{x / best5:.1%}") if best5 > 0 else (lambda x: "n/a")  # no top-5 errors at all: no cut
    return (f"ensemble top1 {ens['top1_err']:.4f} top5 {ens['top5_err']:.4f} best-member top5 {best5:.4f} "
            f"cut {rel(ens['gain_top5_over_best'])} [{rel(lo)}, {rel(hi)}]")

if __name__ == "__main__":
    main()
