"""A job's runs file, assembled from its config: the reported split (`dataset`), the
minival and what was chosen on it, members imported from other runs files, and the
member records. Ray-free: the ensemble job, the search job and `bench/reproduce.py` all
write their runs files through it.
"""
from __future__ import annotations

from orchestrator.base import storage
from orchestrator.config import EnsembleConfig, ResolvedMember
from orchestrator.data.dataset import select_classes
from orchestrator.data.manifest import load_manifest
from orchestrator.data.split_ref import SplitRef
from orchestrator.base.errors import UserError
from orchestrator.records.member import StoredMember
from orchestrator.records.runs_file import Choice, DatasetRef, MemberRecord, MlflowRef, RunsFile, load_runs


def dataset_ref(cfg: EnsembleConfig, labels: str, samples: int | None, split: str | None = None) -> DatasetRef:
    """The reported split (val), or with `split` the minival carved from train."""
    manifest = load_manifest(cfg.data.root)
    kept = select_classes(manifest, cfg.data.classes)
    per_class = cfg.data.train_per_class if split else cfg.data.val_per_class
    return DatasetRef(name=manifest.name, uri=cfg.data.root, split=split or cfg.data.val_split, num_classes=len(kept),
                      samples=samples, labels=labels, classes=cfg.data.classes, per_class=per_class,
                      class_names=[manifest.classes[i]["wnid"] for i in kept])


def minival_ref(cfg: EnsembleConfig, finished: list[StoredMember]) -> tuple[DatasetRef | None, list[Choice]]:
    """The runs file's minival section and what it chose (per-epoch metrics; with a
    search, the trials), when the config has a minival and every member was trained with it."""
    if not cfg.data.minival or not finished or not all(r.minival_labels for r in finished):
        return None, []
    name = str(SplitRef(cfg.data.train_split).carved(cfg.data.minival, cfg.data.minival_seed)[0])
    samples = int(storage.read_npy(finished[0].minival_labels).shape[0])
    ref = dataset_ref(cfg, finished[0].minival_labels, samples, split=name)
    return ref, [Choice(what="per-epoch metrics and Tune's metric (each member keeps its last epoch)", split=name,
                        samples=samples)]


def imported(cfg: EnsembleConfig, members: list[ResolvedMember]) -> list[MemberRecord]:
    """Finished members of the config's `imported_runs` (a search's chosen trials, another
    ensemble): they join this ensemble's runs file as they are, if they were scored on
    the same split, subset and classes, in the same order."""
    out: list[MemberRecord] = []
    names = {m.name for m in members}
    for path in cfg.imported_runs:
        runs = load_runs(path)
        d = runs.dataset
        ours = (storage.absolute(cfg.data.root), cfg.data.val_split, cfg.data.classes, cfg.data.val_per_class)
        theirs = (storage.absolute(d.uri), d.split, d.classes, d.per_class)
        if ours != theirs:
            raise UserError(f"imported_runs {path}: its members were scored on {theirs[0]} split {d.split} "
                            f"(classes {d.classes}, per class {d.per_class}); this ensemble uses {ours[0]} split "
                            f"{ours[1]} (classes {ours[2]}, per class {ours[3]})")
        for m in runs.members:
            if m.status != "finished":
                continue
            if m.name in names:
                raise UserError(f"imported_runs {path}: member name {m.name!r} is already used in this ensemble")
            names.add(m.name)
            out.append(m)
    return out


def with_imported_protocol(cfg: EnsembleConfig, minival, choices: list) -> tuple:
    """Imported members keep the record of what chose them (a search's choice on val rows
    stays out of every report), and their minival when this job has none."""
    for path in cfg.imported_runs:
        runs = load_runs(path)
        choices = choices + [c for c in runs.choices if c not in choices]
        minival = minival or runs.minival
    return minival, choices


def runs_file(cfg: EnsembleConfig, records: list[StoredMember], extra: list[MemberRecord] = (),
              mlflow: MlflowRef | None = None) -> RunsFile:
    """The runs file of `records` (the job's members as stored, with their `labels`) and
    `extra` (imported members) under the config's data."""
    finished = [r for r in records if r.status == "finished"]
    labels = finished[0].labels if finished else ""
    samples = int(finished[0].metrics["val_samples"]) if finished else None
    if not finished and extra:
        d = load_runs(cfg.imported_runs[0]).dataset
        labels, samples = d.labels, d.samples
    dataset = dataset_ref(cfg, labels, samples)
    minival, choices = minival_ref(cfg, finished)
    minival, choices = with_imported_protocol(cfg, minival, choices)
    members = [r.record() for r in records] + list(extra)
    return RunsFile(ensemble=cfg.name, dataset=dataset, minival=minival, choices=choices, members=list(members),
                    mlflow=mlflow)
