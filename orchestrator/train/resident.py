"""Training batches from a split held decoded on the device (`orchestrator/data/resident.py`).

Each pass is the order the streaming path draws from a split in memory (`epoch_order`:
a seeded permutation, or Hikvision's label shuffling), cut into this rank's part
(`rank_part`); a batch is gathered by index on the device and augmented there by the
batch pipeline (`batch_augment.BatchAugment.augment`). One epoch is one pass of
`steps` batches, and every random draw of a pass (crops, flips, colour, mixup, dropout)
comes from generators seeded by (member seed, pass) at its start: a member resumed at an
epoch boundary continues bit for bit as if it had never stopped, with no RNG state to
carry in its checkpoint.
"""
from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from orchestrator.config import ResolvedMember
from orchestrator.data import resident
from orchestrator.data.dataset import Split
from orchestrator.data.resident import Resident
from orchestrator.data.sampling import epoch_length, epoch_order, pass_seed, rank_part
from orchestrator.errors import UserError
from orchestrator.train import augment, batch_augment
from orchestrator.train.batch_augment import BatchAugment


def seed_pass(seed: int, p: int) -> None:
    """Every generator a training step draws from, set for pass p."""
    s = pass_seed(seed, p)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # CPU and every CUDA device


def pass_indices(data: Resident, seed: int, p: int, rank: int, world: int, label_shuffling: bool) -> list[int]:
    """This rank's sample indices of pass p, in order."""
    labels = data.labels.cpu().numpy()
    return rank_part(epoch_order(labels, pass_seed(seed, p), label_shuffling), rank, world)


class ResidentBatches:
    """Endless (x, y) batches on the device, `steps` per pass, from pass `start_pass` on;
    from pass `plain_from` on (strong augmentation off for the last epochs) `plain`
    replaces `augment`."""

    def __init__(self, data: Resident, augment: BatchAugment, *, batch_size: int, steps: int, seed: int,
                 rank: int = 0, world: int = 1, start_pass: int = 0, label_shuffling: bool = False,
                 plain: BatchAugment | None = None, plain_from: int | None = None):
        self.data, self.passes = data, batch_augment.PassAugment(augment, plain, plain_from)
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.rank, self.world, self.start_pass, self.label_shuffling = rank, world, start_pass, label_shuffling
        self.passes_started = 0

    @property
    def bad(self) -> SimpleNamespace:
        """Undecodable images skipped so far: those left out when the split was decoded,
        once per pass started (a streamed pass meets and counts them each time too)."""
        return SimpleNamespace(total=self.data.bad.total * self.passes_started)

    def samples_per_pass(self) -> int:
        """Over all ranks: the pass's length less what `rank_part` drops for equal parts."""
        n = epoch_length(self.data.labels.cpu().numpy(), self.label_shuffling)
        return n // self.world * self.world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.start_pass
        device = self.data.images.device
        while True:
            self.passes_started += 1
            seed_pass(self.seed, p)
            mine = torch.as_tensor(pass_indices(self.data, self.seed, p, self.rank, self.world, self.label_shuffling),
                                   device=device)
            aug = self.passes.for_pass(p)
            for k in range(self.steps):
                idx = mine[k * self.batch_size:(k + 1) * self.batch_size]
                yield aug.augment(self.data.images[idx]), self.data.labels[idx]
            p += 1


def hold_resident(member: ResolvedMember, mode: bool | str, train: Split, device: torch.device,
                  said: dict) -> Resident | None:
    """The train split decoded on `device` when `data.resident` (mode) says so; why goes
    into `said` (the member's notes)."""
    hold, why = resident_choice(member, mode, train, device)
    said["data.placement"] = why
    if not hold:
        return None
    try:
        return resident.load(train, device)
    except resident.MixedSizes:
        if mode is True:
            raise
        said["data.placement"] = "streamed (images of several sizes)"
        return None


def resident_choice(member: ResolvedMember, mode: bool | str, train: Split, device: torch.device) -> tuple[bool, str]:
    """(hold member's train split decoded on device?, why) for data.resident = mode."""
    missing = batch_augment.unsupported(member.recipe.augment.fields(), member.recipe.cam_crops is not None)
    if mode is True and missing:
        raise UserError(f"member {member.name}: data.resident: true needs augmentations with a batch form; "
                        f"{', '.join(missing)} have none (valid: resident: auto or false)")
    return resident.decide(mode, train, device, not missing)


def resident_batches(member: ResolvedMember, fields, ev, held: Resident, device, rank: int, world: int,
                     start_pass: int, plain_from: int | None) -> ResidentBatches:
    recipe = member.recipe

    def build(f):
        return batch_augment.BatchAugment(f, member.input_size, ev.mean, ev.std, device, held.bad)

    stream = ResidentBatches(held, build(fields), batch_size=recipe.batch_size, steps=1, seed=member.seed,
                             rank=rank, world=world, start_pass=start_pass, label_shuffling=recipe.label_shuffling,
                             plain=build(augment.plain_fields(fields)) if plain_from is not None else None,
                             plain_from=plain_from)
    steps = max(stream.samples_per_pass() // world // recipe.batch_size, 1)
    stream.steps = min(steps, recipe.max_steps_per_epoch or steps)
    return stream
