"""Member predictions recomputed from checkpoints, one member at a time.

Used when a member has no cached predictions or test-time augmentation is asked for
(cached files are read by `ensemble/core/stored.py`): the member's checkpoint is rebuilt
through the model registry and run over the split with the member's own eval transform,
batched, on the GPU when there is one, with a progress bar; the split is decoded once for
all members (`ensemble/core/decoded.py`) and the result is cached locally for next time.
"""
from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np
import torch
from rich.progress import Progress

from ensemble.core.decoded import open_decoded, stream_batches
from ensemble.core.stored import MemberPredictions, NpyRows, cache_dir, local_copy
from ensemble.core.tta import TTA_VIEWS, canvas, check_mode, views
from models import load_checkpoint
from orchestrator.data.dataset import open_split
from orchestrator.base.errors import UserError
from orchestrator.records.runs_file import MemberRecord
from orchestrator.train.augment import EvalGeometry, normalize_batch
from orchestrator.train.prefetch import Prefetcher


def loader_workers(device: torch.device) -> int:
    """For a split too large to decode once: decode in 4 loader processes beside a GPU; in
    this process on CPU, where inference already uses every core and loader processes
    would only compete with it (bench/recompute_bench.py: 0.71 of the raw rate with 2
    loader processes on 2 cores)."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


@torch.no_grad()
def recompute(member: MemberRecord, data_root: str, split: str, classes, per_class, tta: str = "none",
              batch_size: int = 128) -> MemberPredictions:
    check_mode(tta)
    if not member.checkpoint:
        raise UserError(f"member {member.name}: no predictions and no checkpoint to recompute them from")
    # the eval transform is part of the key: evaluating a checkpoint at another size is another
    # result; "views-2": the views are cut from the resized image (ensemble/core/tta.py)
    key = hashlib.sha256(f"{member.checkpoint}|{member.eval.model_dump_json()}|{data_root}|{split}|{classes}|"
                         f"{per_class}|{tta}|views-2".encode()).hexdigest()
    cached = cache_dir() / "recomputed" / f"{key[:24]}.npy"
    if cached.exists():
        return MemberPredictions(member.name, NpyRows(str(cached)), f"recomputed ({tta}, cached)",
                                 TTA_VIEWS[tta])
    model, _ = load_checkpoint(local_copy(member.checkpoint, f"member {member.name} checkpoint"),
                               expect_arch=member.arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    ev = member.eval
    geometry = EvalGeometry(*canvas(tta, ev.resize, ev.crop))
    # members sharing an eval geometry read one decoded copy of the split (ensemble/core/decoded.py)
    data = open_decoded(cache_dir(), data_root, split, classes, per_class, geometry)
    if data is not None:
        loader = data.batches(batch_size)
    else:
        data = open_split(data_root, split, classes, per_class)
        loader = stream_batches(data, geometry, batch_size, loader_workers(device))
    out = np.zeros((len(data), data.num_classes), dtype=np.float32)

    def ready(idx, images):
        return idx, normalize_batch(images.to(device, non_blocking=True), ev.mean, ev.std)

    # beside a GPU the next batches are prepared in a thread (on their own stream) while the
    # model runs; on CPU inference already uses every core, and a thread only competes with
    # it (bench/recompute_bench.py: 0.74 with it, 0.87 without, on 2 cores)
    batches = (Prefetcher(loader, ready, device) if device.type == "cuda"
               else (ready(*batch) for batch in loader))
    with Progress(transient=True) as bar, contextlib.closing(batches):
        task = bar.add_task(f"{member.name}: predicting ({tta})", total=len(data))
        for idx, images in batches:
            probs = sum(model(v).float().softmax(1) for v in views(images, tta, ev.crop)) / TTA_VIEWS[tta]
            out[idx.numpy()] = probs.cpu().numpy()
            bar.advance(task, len(idx))
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, out)
    return MemberPredictions(member.name, out, f"recomputed ({tta})", TTA_VIEWS[tta])
