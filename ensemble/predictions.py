"""Member predictions for evaluation: cached or recomputed, one member at a time.

Fast path: the member's cached `predictions` (float32 softmax [N, C], dataset order) is
opened as a memory map (remote files are fetched once into a local cache first), so no
data and no checkpoint is read and only the rows being scored are in memory.

Recompute path (no cached predictions, or test-time augmentation asked for): the
member's checkpoint is rebuilt through the model registry and run over the split with
the member's own eval transform, batched, on the GPU when there is one, with a progress
bar; the split is decoded once for all members (ensemble/decoded.py) and the result is
cached locally for next time.

Storage: float32 probabilities. float16 rounds every probability below ~6e-8 to exactly 0,
so a confident member has fewer than 5 non-zero classes and its zeros tie with a wrong
true class (bench/eval_bench.py measures what float32 costs). Files written as float16
by earlier versions still load, with a warning that their ties may be storage artefacts.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
from rich.progress import Progress

from ensemble.tta import TTA_VIEWS, canvas, check_mode, views
from orchestrator.errors import UserError
from orchestrator.runs_file import MemberRecord

CACHE = Path(os.environ.get("ENSEMBLE_CACHE", Path.home() / ".cache" / "ensemble-eval"))


def local_copy(uri: str, what: str) -> str:
    """A local path for `uri`: itself when local, else a cached download."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            raise UserError(f"{what}: file not found: {uri}")
        return path
    target = CACHE / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:24] / os.path.basename(uri)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        try:
            with fsspec.open(uri, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except FileNotFoundError:
            raise UserError(f"{what}: not found: {uri}") from None
        os.replace(tmp, target)
    return str(target)


class NpyRows:
    """Rows of a 2-D .npy file read on demand with plain file reads. Unlike a memory map,
    pages read stay out of the process's resident memory, so scoring 20 members of
    50,000 x 1,000 keeps O(block) memory."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError("Fortran-ordered arrays are not supported")
        self.shape, self.dtype = shape, dtype
        self.ndim = len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        idx = np.arange(self.shape[0])[index] if not isinstance(index, np.ndarray) else index
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * row)
            block = np.fromfile(f, dtype=self.dtype, count=(hi - lo) * row // self.dtype.itemsize)
        block = block.reshape((hi - lo, *self.shape[1:]))
        return block if hi - lo == len(idx) else block[idx - lo]


def open_npy(uri: str, what: str, rows: bool = False):
    """A .npy from a path or URL: whole (labels) or as `NpyRows` (member predictions)."""
    path = local_copy(uri, what)
    try:
        array = NpyRows(path) if rows else np.load(path)
    except ValueError as exc:
        raise UserError(f"{what}: not a readable .npy file ({exc})") from None
    if rows and array.dtype == np.float16:
        warnings.warn(f"{what}: stored as float16, where probabilities below ~6e-8 are exactly 0; "
                      f"ties with the true class (scored as misses) may be storage artefacts. "
                      f"Recompute with --recompute for exact figures.", stacklevel=2)
    return array


@dataclass
class MemberPredictions:
    """A member's [N, C] probabilities on the split, read by rows on demand."""

    name: str
    array: "np.ndarray | NpyRows"  # float32 rows (float16 from older versions)
    source: str  # "cached" or "recomputed (<tta>)"
    views: int = 1  # forward passes per image (the TTA inference cost)

    def rows(self, index) -> torch.Tensor:
        # torch converts float16 -> float32 vectorised; numpy's astype is ~10x slower here
        return torch.from_numpy(np.ascontiguousarray(self.array[index])).float()


def check_block(name: str, block: torch.Tensor, idx: np.ndarray) -> None:
    """Predictions must be finite probability rows; ~1e-2 slack for older float16 files.
    One pass: a NaN or inf anywhere makes its row sum fail the test too."""
    sums = block.sum(1)
    off = ~((sums - 1).abs() <= 2e-2)
    if off.any():
        row = int(off.nonzero()[0])
        if not torch.isfinite(block[row]).all():
            raise UserError(f"member {name}: predictions contain NaN or inf (row {int(idx[row])})")
        raise UserError(f"member {name}: prediction rows must sum to 1 (row {int(idx[row])} sums to "
                        f"{float(sums[row]):.4f}); are these logits instead of softmax?")


def loader_workers(device: torch.device) -> int:
    """For a split too large to decode once: decode in 4 loader processes beside a GPU; in
    this process on CPU, where inference already uses every core and loader processes
    would only compete with it (bench/recompute_bench.py: 0.71 of the raw rate with 2
    loader processes on 2 cores)."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


@torch.no_grad()
def recompute(member: MemberRecord, data_root: str, split: str, classes, per_class, tta: str = "none",
              batch_size: int = 128) -> MemberPredictions:
    from ensemble.decoded import open_decoded, stream_batches
    from models import load_checkpoint
    from orchestrator.data.dataset import open_split
    from orchestrator.train.augment import EvalGeometry, normalize_batch
    from orchestrator.train.batch_augment import Prefetcher

    check_mode(tta)
    if not member.checkpoint:
        raise UserError(f"member {member.name}: no predictions and no checkpoint to recompute them from")
    # the eval transform is part of the key: evaluating a checkpoint at another size is another
    # result; "views-2": the views are cut from the resized image (ensemble/tta.py)
    key = hashlib.sha256(f"{member.checkpoint}|{member.eval.model_dump_json()}|{data_root}|{split}|{classes}|"
                         f"{per_class}|{tta}|views-2".encode()).hexdigest()
    cached = CACHE / "recomputed" / f"{key[:24]}.npy"
    if cached.exists():
        return MemberPredictions(member.name, NpyRows(str(cached)), f"recomputed ({tta}, cached)",
                                 TTA_VIEWS[tta])
    model, _ = load_checkpoint(local_copy(member.checkpoint, f"member {member.name} checkpoint"),
                               expect_arch=member.arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    ev = member.eval
    geometry = EvalGeometry(*canvas(tta, ev.resize, ev.crop))
    # members sharing an eval geometry read one decoded copy of the split (ensemble/decoded.py)
    data = open_decoded(CACHE, data_root, split, classes, per_class, geometry)
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
