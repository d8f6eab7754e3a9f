"""Training batches from a split held decoded on the device (`orchestrator/data/resident.py`).

Each pass draws what the streaming path draws (`passes.plan_pass`: the same samples,
plain or label-shuffled, the same rank parts), in a seeded order; a batch is gathered by
index on the device and augmented there by the batch pipeline
(`batch_augment.BatchAugment.augment`). One epoch is one pass of `steps` batches cut as
the streaming path cuts them (`sampling.batch_sizes`), and every random draw of a pass (crops, flips, colour, mixup, dropout)
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
from orchestrator.data.passes import plan_pass
from orchestrator.data.resident import Resident
from orchestrator.data.sampling import batch_sizes, pass_draws, pass_seed, steps_per_pass
from orchestrator.base.errors import UserError
from orchestrator.train import augment, batch_augment
from orchestrator.train.batch_augment import BatchAugment


def seed_pass(seed: int, p: int) -> None:
    """Every generator a training step draws from, set for pass p."""
    s = pass_seed(seed, p)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # CPU and every CUDA device


def pass_rows(data: Resident, split: Split, seed: int, p: int, rank: int, world: int, label_shuffling: bool,
              limit: int | None = None) -> np.ndarray:
    """This rank's rows of pass p (the draws `passes.plan_pass` plans for both data modes),
    in a seeded random order; draws of undecodable images are skipped, as streaming skips them."""
    plan = plan_pass(split, data.position_labels, world, seed, p, label_shuffling, limit)
    row_of = np.full(len(data.position_labels), -1, dtype=np.int64)
    row_of[data.positions] = np.arange(len(data.positions))
    rows = row_of[plan.draws(rank)]
    rows = rows[rows >= 0]
    np.random.default_rng(pass_seed(seed, p)).shuffle(rows)
    return rows


class ResidentBatches:
    """Endless (x, y) batches on the device, one pass per epoch, `steps` per pass
    (sampling.batch_sizes), from pass `start_pass` on; from pass `plain_from` on (strong
    augmentation off for the last epochs) `plain` replaces `augment`. `max_steps` caps
    a pass as the streaming path caps it."""

    def __init__(self, data: Resident, split: Split, augment: BatchAugment, *, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, start_pass: int = 0, label_shuffling: bool = False,
                 plain: BatchAugment | None = None, plain_from: int | None = None, max_steps: int | None = None):
        self.data, self.split, self.passes = data, split, batch_augment.PassAugment(augment, plain, plain_from)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world, self.start_pass, self.label_shuffling = rank, world, start_pass, label_shuffling
        self.passes_started = 0
        self.steps = steps_per_pass(self.samples_per_pass(), world, batch_size)
        self.limit = None
        if max_steps and max_steps < self.steps:
            self.steps, self.limit = max_steps, max_steps * batch_size

    @property
    def bad(self) -> SimpleNamespace:
        """Undecodable images skipped so far: those left out when the split was decoded,
        once per pass started (a streamed pass meets and counts them each time too)."""
        return SimpleNamespace(total=self.data.bad.total * self.passes_started)

    def samples_per_pass(self) -> int:
        """Draws of one pass over all ranks (n, or C x N label-shuffled)."""
        return pass_draws(self.data.position_labels, self.label_shuffling)

    def rows(self, p: int) -> np.ndarray:
        return pass_rows(self.data, self.split, self.seed, p, self.rank, self.world, self.label_shuffling,
                         self.limit)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.start_pass
        device = self.data.images.device
        while True:
            self.passes_started += 1
            seed_pass(self.seed, p)
            mine = torch.as_tensor(self.rows(p), device=device)
            aug = self.passes.for_pass(p)
            at = 0
            for size in batch_sizes(len(mine), self.batch_size, self.steps):
                idx = mine[at:at + size]
                at += size
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
    return resident.placement(mode, train, device, not missing)


def resident_batches(member: ResolvedMember, fields, ev, held: Resident, split: Split, device, rank: int,
                     world: int, start_pass: int, plain_from: int | None) -> ResidentBatches:
    recipe = member.recipe

    def build(f):
        return batch_augment.BatchAugment(f, member.input_size, ev.mean, ev.std, device, held.bad)

    return ResidentBatches(held, split, build(fields), batch_size=recipe.batch_size, seed=member.seed,
                           rank=rank, world=world, start_pass=start_pass, label_shuffling=recipe.label_shuffling,
                           plain=build(augment.plain_fields(fields)) if plain_from is not None else None,
                           plain_from=plain_from, max_steps=recipe.max_steps_per_epoch)
