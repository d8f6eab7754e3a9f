"""A training split held decoded: uint8 `[N, 3, H, W]` and its labels, on the device.

Why: small images decode once and then cost nothing per epoch (Tiny-ImageNet at 64 px is
1.2 GB as uint8, its 4-shard subset 0.4 GB); batches are gathered by index where the
model trains and augmented there (`orchestrator/train/resident_batches.py`): no loader
processes, no per-step host copies. This is how the fastest small-image trainers
(airbench, hlb-CIFAR10) reach their speed. On a CPU the same array sits in memory.

`data.resident`: `true` holds the split (an error if it cannot), `false` streams it,
`auto` holds it when its images share one size, the recipe's augmentations have a batch
form, and the array fits `budget_bytes` (a quarter of the device's free memory, of RAM
on a CPU), and, for a GPU, the host has room to stage one chunk. A split whose images
differ in size (ImageNet) is streamed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.data.dataset import BadImages, Split, try_decode
from orchestrator.base.errors import UserError

BUDGET_SHARE = 0.25  # of free device memory (or RAM): the rest is the model's and the loop's
CHUNK_BYTES = 64 * 2**20  # decoded images staged on the host per copy to the device


class MixedSizes(UserError):
    """The split's images differ in size: it cannot be one array."""


@dataclass
class Resident:
    images: torch.Tensor  # uint8 [N, 3, H, W], on the training device
    labels: torch.Tensor  # int64 [N], same device
    bad: BadImages  # undecodable images left out (counted as the streaming path counts them)
    positions: np.ndarray  # each row's position in the split (passes.py); undecodable ones have no row
    position_labels: np.ndarray  # the label of every position, undecodable ones too

    def __len__(self) -> int:
        return len(self.labels)


def first_image_shape(split: Split) -> tuple[int, int] | None:
    """(H, W) of the split's first decodable image: the size every image must share (None
    when nothing decodes; undecodable images are counted and skipped as in streaming)."""
    for sample in split.iter_samples():
        img = try_decode(sample.data, None)
        if img is not None:
            return tuple(img.shape[-2:])
    return None


def decoded_bytes(split: Split, shape: tuple[int, int]) -> int:
    return len(split) * 3 * shape[0] * shape[1]


def budget_bytes(device: torch.device) -> int | None:
    """What the decoded split may take; None for a GPU this process cannot see (a driver
    planning for the cluster's workers)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * BUDGET_SHARE)


def placement(mode: bool | str, split: Split, device: torch.device, batch_form: bool) -> tuple[bool, str]:
    """(hold the split?, why), for `data.resident` = auto | true | false."""
    if mode is False:
        return False, "streamed (data.resident: false)"
    if mode == "auto" and not batch_form:  # decided without reading an image
        return False, "streamed (an augmentation has no batch form)"
    shape = first_image_shape(split)
    if shape is None:
        return False, "streamed (no decodable image)"
    need, budget = decoded_bytes(split, shape), budget_bytes(device)
    size = f"{len(split):,} images of {shape[0]}x{shape[1]} px = {need / 2**20:,.1f} MiB uint8"
    if mode is True:
        return True, f"resident on {device.type} ({size})"
    if budget is None:
        return True, f"resident on cuda if within {BUDGET_SHARE:.0%} of its free memory ({size})"
    if need > budget:
        return False, f"streamed ({size} > budget {budget / 2**20:,.0f} MiB)"
    host = host_available_bytes()
    if device.type != "cpu" and host < 2 * CHUNK_BYTES:
        return False, f"streamed (host memory {host / 2**20:,.0f} MiB free, staging needs {CHUNK_BYTES / 2**20:.0f})"
    return True, f"resident on {device.type} ({size})"


def host_available_bytes() -> int:
    """RAM free for staging now (a GPU split is built through one chunk of it)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def load(split: Split, device: torch.device) -> Resident:
    """Decode every image of `split` once, in dataset order, into one uint8 array made on
    `device`, filled a chunk at a time: the host holds one chunk (CHUNK_BYTES), never the
    whole array, so members packed on one GPU do not each stage their split in RAM."""
    shape = first_image_shape(split)
    n, per = len(split), max(1, CHUNK_BYTES // (3 * shape[0] * shape[1]))
    images = torch.empty((n, 3, *shape), dtype=torch.uint8, device=device)
    labels = torch.empty(n, dtype=torch.int64, device=device)
    stage, stage_labels = torch.empty((min(per, n), 3, *shape), dtype=torch.uint8), torch.empty(min(per, n),
                                                                                               dtype=torch.int64)
    bad, kept, filled = BadImages(), 0, 0
    positions, position_labels = [], []
    for pos, s in enumerate(split.iter_samples()):
        position_labels.append(s.label)
        img = try_decode(s.data, bad)
        if img is None:
            continue
        positions.append(pos)
        if tuple(img.shape[-2:]) != shape:
            raise MixedSizes(f"data.resident holds images of one size: {s.key} is {img.shape[-2]}x{img.shape[-1]}, "
                            f"the first {shape[0]}x{shape[1]} (valid choices: resident: auto or false)")
        stage[filled], stage_labels[filled] = img, s.label
        filled += 1
        if filled == len(stage):
            kept = _flush(stage, stage_labels, filled, images, labels, kept)
            filled = 0
    kept = _flush(stage, stage_labels, filled, images, labels, kept)
    return Resident(images[:kept], labels[:kept], bad, np.asarray(positions, dtype=np.int64),
                    np.asarray(position_labels, dtype=np.int64))


def _flush(stage, stage_labels, filled: int, images, labels, kept: int) -> int:
    images[kept:kept + filled].copy_(stage[:filled])
    labels[kept:kept + filled].copy_(stage_labels[:filled])
    return kept + filled
