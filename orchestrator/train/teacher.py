"""Knowledge a recipe borrows from already trained members (its "teacher"): the CAMs that
guide crops, the confusion prior that guides label smoothing, and the ensemble a student
is distilled from.

A teacher is named by a runs file and a member name in it, so any finished member of an
ensemble or a search can serve; its class set must be the one being trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from orchestrator.base import storage
from orchestrator.config import Recipe, Teacher
from orchestrator.base.errors import UserError, unknown_name
from orchestrator.records.runs_file import MemberRecord, RunsFile, load_runs
from models import load_checkpoint
from orchestrator.train.cam import CamMaps, cam_batches, write_cam_maps
from orchestrator.train.confusion import confusion_prior, smoothing_matrix
from orchestrator.train.distill import DistillLoss, TeacherEnsemble


def find_teacher(teacher: Teacher) -> tuple[RunsFile, MemberRecord]:
    runs = load_runs(teacher.runs)
    by_name = {m.name: m for m in runs.members if m.status == "finished"}
    if teacher.member not in by_name:
        raise unknown_name(f"finished member of {teacher.runs}", teacher.member, by_name)
    return runs, by_name[teacher.member]


def _check_classes(runs: RunsFile, class_names: list[str], what: str) -> None:
    if runs.dataset.num_classes != len(class_names) or (
            runs.dataset.class_names and runs.dataset.class_names != class_names):
        raise UserError(f"{what}: the teacher was trained on {runs.dataset.num_classes} classes"
                        f"{' (other wnids)' if runs.dataset.num_classes == len(class_names) else ''}, "
                        f"this member on {len(class_names)}; use a teacher of the same class set")


def load_confusion_smoothing(recipe: Recipe, class_names: list[str]) -> torch.Tensor | None:
    """The smoothing matrix S (targets = S[y]) of a recipe with a confusion prior, else None."""
    cp = recipe.confusion_prior
    if cp is None:
        return None
    runs, member = find_teacher(cp.teacher)
    _check_classes(runs, class_names, "confusion_prior")
    probs, labels = confusion_source(runs, member, cp.teacher.runs)
    prior = confusion_prior(probs, labels, cp.k)
    return smoothing_matrix(prior, recipe.augment.fields().label_smoothing)


def confusion_source(runs: RunsFile, member: MemberRecord, where: str):
    """(probabilities, labels) the confusion statistics come from: the teacher's minival
    predictions, so that val stays unseen; a teacher trained without a minival falls back
    to its val predictions, with a warning that val then informed training."""
    if runs.minival is not None and member.minival_predictions:
        return storage.read_npy(member.minival_predictions), storage.read_npy(runs.minival.labels)
    if not member.predictions:
        raise UserError(f"confusion_prior: member {member.name} of {where} has no cached predictions")
    print(f"warning: confusion_prior: teacher {member.name} of {where} has no minival predictions; its confusion "
          f"statistics come from val, so val then informs training (train the teacher with data.minival)",
          file=sys.stderr, flush=True)
    return storage.read_npy(member.predictions), storage.read_npy(runs.dataset.labels)


def load_cam_maps(recipe: Recipe, split, device, workers: int = 0):
    """The CAM of each train sample's true class from the recipe's CAM teacher (a `CamMaps`:
    key -> map, memory-mapped), else None. Computed once per teacher and split and stored
    beside the teacher's weights (`<weights folder>/cam/<split id>/`); every later start,
    resume or other member using the same teacher reads it. A remote teacher's maps are
    fetched once per machine into `$ENSEMBLE_CAM_CACHE` (default ~/.cache/ensemble-cam).
    The build is one pass with the member's loaders: `workers` processes decode, each
    reading its own shards, while the teacher runs on `device`."""
    cc = recipe.cam_crops
    if cc is None:
        return None
    runs, member = find_teacher(cc.teacher)
    _check_classes(runs, split.class_names, "cam_crops")
    if not member.checkpoint:
        raise UserError(f"cam_crops: member {member.name} of {cc.teacher.runs} has no checkpoint")
    ident = hashlib.sha256(json.dumps([member.checkpoint, split.manifest.root, str(split.split), split.kept,
                                       split.per_class, member.eval.input_size]).encode()).hexdigest()[:16]
    stored = storage.join(member.checkpoint.rsplit("/", 1)[0], "cam", ident)
    local = stored if not storage.is_remote(stored) else os.path.join(
        os.environ.get("ENSEMBLE_CAM_CACHE", os.path.expanduser("~/.cache/ensemble-cam")), ident)
    if os.path.exists(os.path.join(local, "maps.npy")):
        return CamMaps(local)
    if storage.is_remote(stored) and _fetch(stored, local):
        return CamMaps(local)
    maps = _build_cam_maps(member, split, device, local, workers)
    if storage.is_remote(stored):
        _upload(local, stored)
    return maps


CAM_FILES = ("keys.npy", "rows.npy", "maps.npy")  # maps last: its presence marks a complete set


def _upload(local: str, stored: str) -> None:
    import fsspec

    def put():
        fs, path = fsspec.core.url_to_fs(stored)
        for name in CAM_FILES:  # in this order: maps.npy, last, marks the set complete
            fs.put_file(os.path.join(local, name), f"{path.rstrip('/')}/{name}")
    storage.retry(put, f"uploading {stored}")


def _fetch(stored: str, local: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(storage.join(stored, "maps.npy"))
    if not fs.exists(path):
        return False
    os.makedirs(local, exist_ok=True)
    for name in CAM_FILES:
        fs.get(storage.join(stored, name), os.path.join(local, name + ".partial"))
    for name in CAM_FILES:
        os.replace(os.path.join(local, name + ".partial"), os.path.join(local, name))
    return True


def _build_cam_maps(member: MemberRecord, split, device, folder: str, workers: int):
    model, _ = load_checkpoint(member.checkpoint)
    ev = member.eval
    return write_cam_maps(folder, model, cam_batches(split, ev.input_size, ev.mean, ev.std, workers), len(split),
                          device)


def load_distill_teacher(recipe: Recipe, class_names: list[str], student: tuple[int, list, list], device):
    """The ensemble a recipe's `distill` learns from (orchestrator/train/distill.py), on
    `device`, or None when the recipe does not distill or its alpha is 0 (plain training)."""
    d = recipe.distill
    if d is None or d.alpha == 0:
        return None
    runs = load_runs(d.teacher.runs)
    _check_classes(runs, class_names, "distill")
    members = runs.ensemble_members()
    if d.teacher.members:
        by_name = {m.name: m for m in members}
        unknown = [n for n in d.teacher.members if n not in by_name]
        if unknown:
            raise unknown_name(f"finished ensemble member of {d.teacher.runs}", unknown[0], by_name)
        members = [by_name[n] for n in d.teacher.members]
    if not members:
        raise UserError(f"distill: {d.teacher.runs} has no finished ensemble member to learn from")
    models = [load_checkpoint(m.checkpoint, expect_arch=m.arch)[0].to(device) for m in members]
    geometry = [(m.eval.input_size, list(m.eval.mean), list(m.eval.std)) for m in members]
    return TeacherEnsemble(models, geometry, student, method=d.teacher.combination).to(device)


def distilled(criterion, recipe: Recipe, class_names: list[str], student: tuple[int, list, list], device,
              said: dict):
    """`criterion` as the hard term of a DistillLoss when the recipe distills (alpha > 0)."""
    ensemble = load_distill_teacher(recipe, class_names, student, device)
    if ensemble is None:
        return criterion
    d = recipe.distill
    said["distill"] = (f"distilled from {len(ensemble.members)} members of {d.teacher.runs} "
                       f"(T {d.temperature:g}, alpha {d.alpha:g})")
    return DistillLoss(criterion, ensemble, d.temperature, d.alpha)
