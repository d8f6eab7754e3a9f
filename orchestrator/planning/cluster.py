"""The planner's model of a cluster, used by `python -m orchestrator.planning.plan`.

Throughput per member: measured images/s (`--measured`: a previous runs.yaml, or the
cluster file's `throughput:` by member name or arch) when there is one; otherwise an
estimate (marked * in the table). On a GPU a training step costs its FLOPs at an
effective rate plus a fixed time per layer per batch (kernel launches: what makes
Inception's many small branches slower than their FLOPs say), both fitted on one H200's
measured training rates (ResNet-18 and ResNet-50 224 px batch 256: 13,283 and 4,726
images/s; VGG-16 224 px and Inception-v3 299 px batch 128: 3,533 and 2,293; low-res
ResNet-18 32 px batch 512: 57,303), each estimate within 1.5x of its reference; on CPU,
FLOPs at the rate of two cores (low-res ResNet-18 64 px: 93 images/s); times the packing
gain of small members sharing a GPU. FLOPs and layers are counted on the meta device
(no weights are allocated, no time goes to initialising them). Placement simulates Ray's gang scheduling: longest members first, each
worker group placed whole when CPUs/GPUs are free (one node if it fits, else spread),
the rest waiting for the next to finish. A member that can never fit is refused.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import yaml
from pydantic import Field

from models.cost import model_cost
from orchestrator.config import H200_PACKING_GAINS, ResolvedMember, Strict
from orchestrator.base.errors import UserError


GPU_FLOPS_PER_S = 45e12  # training images/s x forward FLOPs, one H200 (median of the reference nets): utilisation
TRAIN_FLOPS_PER_S = 1.27e14  # rate model, fitted (see above): forward FLOPs per second of a training step ...
LAYER_SECONDS = 1.32e-4  # ... plus this many seconds per layer per batch
CPU_FLOPS_PER_S = 2.07e11  # per core: low-res ResNet-18 64 px, 4.44 GFLOPs, 93 images/s on 2 cores
DDP_EFFICIENCY = 0.9


class NodeType(Strict):
    name: str
    count: int = Field(ge=1)
    cpus: float = Field(gt=0)
    gpus: float = Field(0, ge=0)
    gpu_hour_price: float = Field(0, ge=0, description="per GPU, for the cost column")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU (packing)")


class Cluster(Strict):
    name: str
    nodes: list[NodeType] = Field(min_length=1)
    gpu_speed: float = Field(1.0, gt=0, description="relative to one H200 (H100 ~0.8, A100 ~0.45)")
    throughput: dict[str, float] = {}  # images/s of a member (by name) or an arch, on its resources
    packing_gains: dict[int, float] | None = None  # bench/pack_bench.py --out on this cluster's GPU


def load_cluster(path: str) -> Cluster:
    from pydantic import ValidationError

    try:
        with open(path) as f:
            return Cluster.model_validate(yaml.safe_load(f))
    except FileNotFoundError:
        raise UserError(f"cluster file not found: {path}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {what}") from None


def forward_flops(arch: str, low_res: bool, size: int, num_classes: int) -> float:
    return model_cost(arch, low_res, size, num_classes)[0]


def packing_share(gpus_per_worker: float, gains: dict[int, float] | None = None) -> float:
    """A trainer's images/s on a 1/K GPU share, relative to having the GPU alone."""
    gains = gains or H200_PACKING_GAINS
    k = max(1, round(1 / gpus_per_worker)) if gpus_per_worker < 1 else 1
    near = min(gains, key=lambda p: abs(p - k))
    return gains[near] / near


def estimated_rate(m: ResolvedMember, cluster: Cluster, num_classes: int) -> float:
    """Images/s of the whole member (all its workers) from FLOPs and the references."""
    r = m.resources
    flops, layers = model_cost(m.arch, m.low_res, m.input_size, num_classes)
    if r.use_gpu:
        seconds = flops / TRAIN_FLOPS_PER_S + layers * LAYER_SECONDS / m.recipe.batch_size
        per_worker = cluster.gpu_speed / seconds * packing_share(r.gpus_per_worker, cluster.packing_gains)
    else:
        per_worker = CPU_FLOPS_PER_S * r.cpus_per_worker / flops
    return per_worker * r.workers * (DDP_EFFICIENCY if r.workers > 1 else 1.0)


@dataclass
class Node:
    name: str
    cpus: float
    gpus: float
    price: float
    free_cpus: float = field(init=False)
    free_gpus: float = field(init=False)

    def __post_init__(self):
        self.free_cpus, self.free_gpus = self.cpus, self.gpus


def _bundle(m: ResolvedMember) -> tuple[float, float]:
    r = m.resources
    return r.cpus_per_worker, (r.gpus_per_worker if r.use_gpu else 0.0)


def _place(m: ResolvedMember, nodes: list[Node], commit: bool) -> list[str] | None:
    """Nodes for the member's trial actor and workers (all or nothing), or None."""
    cpu, gpu = _bundle(m)
    saved = [(n.free_cpus, n.free_gpus) for n in nodes]
    chosen: list[str] = []
    needs = [(cpu + m.resources.trial_cpus, gpu)] + [(cpu, gpu)] * (m.resources.workers - 1)
    # PACK: prefer one node that takes the whole group, else spread over several
    whole = [n for n in nodes if n.free_cpus + 1e-9 >= sum(c for c, _ in needs)
             and n.free_gpus + 1e-9 >= sum(g for _, g in needs)]
    order = whole[:1] + [n for n in nodes if n not in whole[:1]]
    for c, g in needs:
        node = next((n for n in order if n.free_cpus + 1e-9 >= c and n.free_gpus + 1e-9 >= g), None)
        if node is None:
            for n, (fc, fg) in zip(nodes, saved):
                n.free_cpus, n.free_gpus = fc, fg
            return None
        node.free_cpus -= c
        node.free_gpus -= g
        chosen.append(node.name)
    if not commit:
        for n, (fc, fg) in zip(nodes, saved):
            n.free_cpus, n.free_gpus = fc, fg
    return chosen


def _release(m: ResolvedMember, placed: list[str], nodes: list[Node]) -> None:
    cpu, gpu = _bundle(m)
    by_name = {n.name: n for n in nodes}
    for i, name in enumerate(placed):
        by_name[name].free_cpus += cpu + (m.resources.trial_cpus if i == 0 else 0)
        by_name[name].free_gpus += gpu


def build_nodes(cluster: Cluster) -> list[Node]:
    return [Node(f"{t.name}-{i}", t.cpus, t.gpus, t.gpu_hour_price) for t in cluster.nodes for i in range(t.count)]


def plan(members: list[ResolvedMember], samples: int, cluster: Cluster, rates: dict[str, float]) -> dict:
    """Simulated schedule: {"rows": [...], "wall_hours", "gpu_hours", "cost"}."""
    nodes = build_nodes(cluster)
    for m in members:  # refuse what can never fit, even on an empty cluster
        if _place(m, build_nodes(cluster), commit=False) is None:
            cpu, gpu = _bundle(m)
            raise UserError(f"member {m.name} needs {m.resources.workers} x ({cpu:g} CPU, {gpu:g} GPU) + "
                            f"{m.resources.trial_cpus:g} CPU at once, more than cluster {cluster.name} has: lower its workers "
                            f"or per-worker resources, or add nodes")
    duration = {m.key: m.recipe.epochs * samples / rates[m.key] for m in members}
    pending = sorted(members, key=lambda m: -duration[m.key])  # longest first
    running: list[tuple[float, int, ResolvedMember, list[str]]] = []
    rows, now, tick = [], 0.0, 0
    while pending or running:
        for m in list(pending):
            placed = _place(m, nodes, commit=True)
            if placed is not None:
                pending.remove(m)
                end = now + duration[m.key]
                heapq.heappush(running, (end, tick, m, placed))
                tick += 1
                _, gpu = _bundle(m)
                gpus = gpu * m.resources.workers
                price = max((n.price for n in nodes if n.name in placed), default=0.0)
                rows.append({"member": m.name, "arch": m.arch, "nodes": sorted(set(placed)),
                             "workers": m.resources.workers, "gpus": gpus, "start_h": now / 3600,
                             "end_h": end / 3600, "images_per_s": rates[m.key],
                             "gpu_hours": gpus * duration[m.key] / 3600,
                             "cost": gpus * duration[m.key] / 3600 * price})
        end, _, m, placed = heapq.heappop(running)
        now = end
        _release(m, placed, nodes)
    gpu_total = sum(n.gpus for n in nodes)
    wall = max(r["end_h"] for r in rows)
    gpu_hours = sum(r["gpu_hours"] for r in rows)
    return {"rows": rows, "wall_hours": wall, "gpu_hours": gpu_hours, "cost": sum(r["cost"] for r in rows),
            "gpu_utilisation": gpu_hours / (gpu_total * wall) if gpu_total and wall else 0.0}


def is_measured(m: ResolvedMember, cluster: Cluster, measured: dict[str, float]) -> bool:
    return bool(measured.get(m.name) or cluster.throughput.get(m.name) or cluster.throughput.get(m.arch))


def member_rates(members, cluster: Cluster, num_classes: int, measured: dict[str, float]) -> dict[str, float]:
    """Images/s per member key. A measured or declared rate of a `gpus_per_worker: auto`
    member counts as its rate alone on a GPU, scaled by the packing gain of its share."""
    from rich.progress import Progress

    rates = {}
    with Progress(transient=True) as bar:
        task = bar.add_task("estimating members' rates", total=len(members))
        for m in members:
            rates[m.key] = _rate(m, cluster, num_classes, measured)
            bar.advance(task)
    return rates


def _rate(m: ResolvedMember, cluster: Cluster, num_classes: int, measured: dict[str, float]) -> float:
    rate = measured.get(m.name) or cluster.throughput.get(m.name) or cluster.throughput.get(m.arch)
    if rate and m.packing is not None and m.resources.use_gpu:
        rate *= packing_share(m.resources.gpus_per_worker, cluster.packing_gains)
    return rate or estimated_rate(m, cluster, num_classes)
