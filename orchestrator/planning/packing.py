"""How many small members share one GPU, decided from their memory and throughput.

Small members pack as separate single-worker trials holding a fraction of a GPU
(`gpus_per_worker = 1/K`), never as fractional workers of one DDP run (two NCCL ranks on
one GPU fail). A member with `resources.gpus_per_worker: auto` gets the K that

- fits: K x its peak GPU memory (declared `resources.gpu_memory_gb`, or measured: the
  `gpu_memory_gb` a previous run recorded) within `headroom` of the GPU's memory;
- pays: each step up in K must add at least `min_step_gain` to the measured total
  throughput of K trainers on one GPU (`gains`, as `bench/pack_bench.py --out` writes;
  reference: 1, 2.32, 3.5, 3.44 x for K = 1, 2, 4, 8 ResNet-18s on an H200, BACKGROUND.md);
- is wanted: a member whose measured rate alone already reaches `saturated` of what the
  GPU delivers on big nets (images/s x forward FLOPs against the reference) is not packed.

Without a memory figure a member is not packed: guessing wrong costs an out-of-memory
failure, guessing conservatively only some throughput.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.base.errors import UserError

if TYPE_CHECKING:  # the options' type only: the config's loader imports this module
    from orchestrator.config.schema import PackingOpts


@dataclass(frozen=True)
class Decision:
    k: int  # members per GPU
    gain: float  # total throughput of the K against one alone
    reason: str

    @property
    def gpus_per_worker(self) -> float:
        return 1.0 / self.k


def packing_for(name: str, memory_gb: float | None, opts: PackingOpts, utilisation: float | None = None) -> Decision:
    """K for one single-worker member; `utilisation` = its measured solo share of the GPU."""
    if memory_gb is None:
        return Decision(1, 1.0, "no memory figure: declare resources.gpu_memory_gb or plan with --measured")
    budget = opts.headroom * opts.gpu_memory_gb
    if memory_gb > budget:
        raise UserError(f"member {name} needs {memory_gb:g} GB of GPU memory; one GPU offers {budget:g} GB "
                        f"({opts.headroom:.0%} of {opts.gpu_memory_gb:g} GB): lower its batch size")
    if utilisation is not None and utilisation >= opts.saturated:
        return Decision(1, 1.0, f"fills the GPU alone ({utilisation:.0%} of the reference rate)")
    fits = int(budget // memory_gb)
    gains = {1: 1.0, **opts.gains}
    k = 1
    for cand in sorted(gains):
        if k < cand <= fits and gains[cand] >= gains[k] * opts.min_step_gain:
            k = cand
    # what stopped K: the next larger K of the curve not fitting, or not gaining enough
    larger = [c for c in gains if c > k]
    limit = "memory" if larger and min(larger) > fits else "gain"
    return Decision(k, gains[k], f"{memory_gb:g} GB each, {fits} fit; K={k} by {limit}")


def resolve_auto(name: str, resources, opts: PackingOpts, memory_gb: float | None = None,
                 utilisation: float | None = None) -> tuple[float, Decision | None]:
    """The GPU share for a member's resources: `auto` decided here, a number kept."""
    if resources.gpus_per_worker != "auto":
        return float(resources.gpus_per_worker), None
    if not resources.use_gpu or resources.workers > 1:  # DDP ranks cannot share a GPU
        return 1.0, Decision(1, 1.0, "data-parallel: one GPU per worker" if resources.use_gpu else "no GPU")
    decision = packing_for(name, memory_gb if memory_gb is not None else resources.gpu_memory_gb, opts, utilisation)
    return decision.gpus_per_worker, decision
