"""What a network costs to run: parameters, multiply-adds at its evaluation geometry, and,
measured on the machine named, inference images/s at batch 1 and batch 64 and the peak
memory of a batch-64 forward pass (Canziani, Paszke and Culurciello 2016, "An analysis of
deep neural network models for practical applications", set accuracy against exactly
these).

Multiply-adds are counted by torch's FlopCounterMode on the meta device (shapes only, no
weights: ResNet-50 in 0.1 s) and halved, since it counts a multiply-add as two FLOPs; the
convention of the ImageNet model tables (ResNet-50 at 224 px: 4.1 G). The planner uses
the same count for its training estimates (orchestrator/planning/cluster.py).
"""
from __future__ import annotations

import platform
import time
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.registry import build_model

# what a member's record keeps of its inference cost (orchestrator/records/member.py)
COST_KEYS = ("macs", "infer_ms_b1", "infer_images_per_s_b64", "infer_peak_mb")


@lru_cache(maxsize=None)
def model_cost(arch: str, low_res: bool, size: int, num_classes: int) -> tuple[float, int]:
    """(forward FLOPs of one image, layers that produce a tensor), counted on the meta device."""
    with torch.device("meta"):
        model = build_model(arch, num_classes=num_classes, low_res=low_res).eval()
    layers = [0]

    def count(module, inputs, output):
        layers[0] += torch.is_tensor(output)
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return float(counter.get_total_flops()), layers[0]


def multiply_adds(arch: str, low_res: bool, size: int, num_classes: int) -> float:
    """Multiply-adds of one forward pass of one image (one view)."""
    return model_cost(arch, low_res, size, num_classes)[0] / 2


def machine(device: torch.device) -> str:
    """The machine a cost was measured on, in words."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"


def inference_cost(model: torch.nn.Module, arch: str, low_res: bool, size: int, num_classes: int,
                   device: torch.device, min_seconds: float = 0.05) -> dict:
    """`model`'s cost at `size` px: parameters, multiply-adds (one view), milliseconds an
    image at batch 1, images/s at batch 64, peak memory (MiB) of a batch-64 pass, and the
    machine it was measured on. Each timing runs passes until `min_seconds` (one at least):
    on a CPU a member's measurement costs about two batch-64 passes."""
    net = getattr(model, "module", model)
    was_training, cuda = net.training, device.type == "cuda"
    net.eval()
    out = {"params": sum(p.numel() for p in net.parameters()), "macs": multiply_adds(arch, low_res, size, num_classes),
           "cost_machine": machine(device)}
    try:
        out["infer_ms_b1"] = 1000 * _seconds_per_pass(net, 1, size, device, min_seconds)
        before = _peak_reset(device)
        out["infer_images_per_s_b64"] = 64 / _seconds_per_pass(net, 64, size, device, min_seconds, warm=cuda)
        out["infer_peak_mb"] = _peak_mb(device, before)
    finally:
        net.train(was_training)
    return out


@torch.no_grad()
def _seconds_per_pass(net, batch: int, size: int, device: torch.device, min_seconds: float,
                      warm: bool = True) -> float:
    """Seconds a forward pass of `batch` images takes: passes until `min_seconds` (one at
    least), after a warm-up pass when `warm` (the batch-64 timing follows the batch-1 one,
    which has warmed the network: a second warm-up would double its cost on a CPU)."""
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # the numerics evaluation runs in
        if warm:
            net(x)
        if cuda:
            torch.cuda.synchronize(device)
        start, passes = time.perf_counter(), 0
        while passes < 1 or time.perf_counter() - start < min_seconds:
            net(x)
            passes += 1
        if cuda:
            torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / passes


def _peak_reset(device: torch.device) -> int:
    """Start a peak-memory window: on CUDA the allocator's peak, on a CPU the process's
    peak RSS (Linux: VmHWM, reset by writing 5 to clear_refs). Returns the baseline."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def _peak_mb(device: torch.device, before: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return max(0, _status_kb("VmHWM") * 1024 - before) / 2**20


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0
