"""Prediction files as evaluation reads them: a member's float32 softmax [N, C] in
dataset order, opened by rows on demand (remote files fetched once into a local cache),
checked block by block as they are scored.

Storage: float32 probabilities. float16 rounds every probability below ~6e-8 to exactly 0,
so a confident member has fewer than 5 non-zero classes and its zeros tie with a wrong
true class (bench/eval_bench.py measures what float32 costs). Files written as float16
by earlier versions still load, with a warning that their ties may be storage artefacts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

from orchestrator.base.errors import UserError


def cache_dir() -> Path:
    """Where remote predictions and recomputed ones are kept: `$ENSEMBLE_CACHE`, read when
    used (not at import), else ~/.cache/ensemble-eval."""
    return Path(os.environ.get("ENSEMBLE_CACHE", Path.home() / ".cache" / "ensemble-eval"))


def local_copy(uri: str, what: str) -> str:
    """A local path for `uri`: itself when local, else a cached download."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not os.path.exists(path):
            raise UserError(f"{what}: file not found: {uri}")
        return path
    target = cache_dir() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:24] / os.path.basename(uri)
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
        """numpy's rows for any index: an int, a slice, or an index array in any order,
        with repeats and negatives. One read of the span from the lowest to the highest row
        asked for; rows are then taken from it in the order asked."""
        idx = np.arange(self.shape[0])[index]  # numpy's own rules: bounds, negatives, slices
        if idx.ndim == 0:
            return self[idx.reshape(1)][0]
        if idx.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * row)
            block = np.fromfile(f, dtype=self.dtype, count=(hi - lo) * row // self.dtype.itemsize)
        block = block.reshape((hi - lo, *self.shape[1:]))
        in_order = hi - lo == len(idx) and bool(np.all(np.diff(idx) == 1))
        return block if in_order else block[idx - lo]


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
