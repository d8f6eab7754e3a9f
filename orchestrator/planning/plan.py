"""`python -m orchestrator.planning.plan`: where each member of an ensemble would run on a given
cluster, for how long, and at what cost, before anything is launched.

    python -m orchestrator.planning.plan --config configs/tiny-imagenet-20.yaml --cluster infra/clusters/aws-2x8gpu.yaml
    python -m orchestrator.planning.plan --config C --cluster K --measured s3://bucket/ens/runs.yaml

The model of the cluster (node types, the rate of each member, the placement over time)
is `orchestrator/planning/cluster.py`.
"""
from __future__ import annotations

import argparse

from orchestrator.planning.cluster import GPU_FLOPS_PER_S, Cluster, forward_flops, is_measured, load_cluster, member_rates, plan
from orchestrator.config import ResolvedMember, load_config, resolve_members
from orchestrator.base.errors import exit_on_user_error
from orchestrator.data.dataset import select_classes
from orchestrator.data.manifest import load_manifest
from orchestrator.planning.packing import packing_for
from orchestrator.records.runs_file import load_runs

def _measured(path: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """A runs file's finished members: {name: images/s}, {name: peak GPU memory in GB}."""
    if not path:
        return {}, {}

    done = [m for m in load_runs(path).members if m.status == "finished"]
    return ({m.name: m.metrics["images_per_s"] for m in done if m.metrics.get("images_per_s")},
            {m.name: m.metrics["gpu_memory_gb"] for m in done if m.metrics.get("gpu_memory_gb")})


def apply_packing(members: list[ResolvedMember], opts, cluster: Cluster, num_classes: int,
                  rates: dict[str, float], memory: dict[str, float]) -> tuple[list[ResolvedMember], dict[str, str]]:
    """Re-decide `gpus_per_worker: auto` members (orchestrator/planning/packing.py) with this
    cluster's GPU memory and packing gains and the measured memory and solo rate."""
    gpu_memory = max((t.gpu_memory_gb for t in cluster.nodes if t.gpu_memory_gb), default=None)
    opts = opts.model_copy(update={k: v for k, v in (("gpu_memory_gb", gpu_memory),
                                                     ("gains", cluster.packing_gains)) if v})
    out, reasons = [], {}
    for m in members:
        if m.packing is None or not m.resources.use_gpu or m.resources.workers > 1:
            out.append(m)
            continue
        solo = rates.get(m.name)
        utilisation = (solo * forward_flops(m.arch, m.low_res, m.input_size, num_classes)
                       / (GPU_FLOPS_PER_S * cluster.gpu_speed)) if solo else None
        d = packing_for(m.name, memory.get(m.name, m.resources.gpu_memory_gb), opts, utilisation)
        reasons[m.name] = f"K={d.k} ({d.gain:.2f}x): {d.reason}"
        out.append(m.model_copy(update={"resources": m.resources.model_copy(update={"gpus_per_worker": d.gpus_per_worker}),
                                        "packing": d.reason}))
    return out, reasons


def unpacked(members: list[ResolvedMember]) -> list[ResolvedMember]:
    """The same members with every auto-packed one on a GPU of its own (for comparison)."""
    return [m.model_copy(update={"resources": m.resources.model_copy(update={"gpus_per_worker": 1.0})})
            if m.packing is not None and m.resources.use_gpu else m for m in members]


def _train_samples(cfg) -> tuple[int, int]:
    manifest = load_manifest(cfg.data.root)
    kept = select_classes(manifest, cfg.data.classes)
    total = sum(s.samples for s in manifest.shards(cfg.data.train_split))
    per_class = total / manifest.num_classes
    if cfg.data.train_per_class:
        per_class = min(per_class, cfg.data.train_per_class)
    return int(cfg.data.member_per_class(per_class) * len(kept)), len(kept)


def print_plan(result: dict, cluster: Cluster, estimated: set[str] = frozenset()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan on {cluster.name}")
    for col in ("member", "arch", "nodes", "workers x GPU", "images/s", "start h", "end h", "GPU-h"):
        table.add_column(col, justify="left" if col in ("member", "arch", "nodes") else "right")
    for r in sorted(result["rows"], key=lambda r: (r["start_h"], r["member"])):
        table.add_row(r["member"], r["arch"], ",".join(r["nodes"]), f"{r['workers']} x {r['gpus'] / r['workers']:g}",
                      f"{r['images_per_s']:,.0f}{'*' if r['member'] in estimated else ''}", f"{r['start_h']:.2f}",
                      f"{r['end_h']:.2f}", f"{r['gpu_hours']:.2f}")
    console = Console(width=None if Console().is_terminal else 140)
    console.print(table)
    cost = f", cost {result['cost']:,.2f}" if result["cost"] else ""
    console.print(f"wall time {result['wall_hours']:.2f} h, {result['gpu_hours']:.2f} GPU-hours, GPU utilisation "
                  f"{result['gpu_utilisation']:.0%}{cost}")
    if estimated:
        rest = "" if len(estimated) == len(result["rows"]) else "; the rest measured"
        console.print(f"* {len(estimated)} of {len(result['rows'])} rates estimated from FLOPs and layers (within "
                      f"1.5x of one H200's measured rates){rest}; `--measured runs.yaml` replaces estimates")


@exit_on_user_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", required=True, help="ensemble config YAML")
    p.add_argument("--cluster", required=True, help="cluster description YAML (see infra/clusters/)")
    p.add_argument("--measured", help="a runs.yaml whose members' images/s replace the estimates")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    members = resolve_members(cfg)
    cluster = load_cluster(args.cluster)
    samples, classes = _train_samples(cfg)
    measured_rates, measured_memory = _measured(args.measured)
    members, reasons = apply_packing(members, cfg.packing, cluster, classes, measured_rates, measured_memory)
    rates = member_rates(members, cluster, classes, measured_rates)
    result = plan(members, samples, cluster, rates)
    print_plan(result, cluster, {m.name for m in members if not is_measured(m, cluster, measured_rates)})
    if reasons:
        print_packing(reasons, result, plan(unpacked(members), samples, cluster,
                                            member_rates(unpacked(members), cluster, classes, measured_rates)))
    return 0


def print_packing(reasons: dict[str, str], packed: dict, alone: dict) -> None:
    """Each auto member's decision, and the aggregate gain against one GPU per member."""
    for name, why in reasons.items():
        print(f"packing {name}: {why}")
    print(f"packing gain: wall time {packed['wall_hours']:.2f} h packed vs {alone['wall_hours']:.2f} h with a GPU "
          f"per member ({alone['wall_hours'] / max(packed['wall_hours'], 1e-9):.2f}x); GPU-hours "
          f"{packed['gpu_hours']:.2f} vs {alone['gpu_hours']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
