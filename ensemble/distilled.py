"""A distilled student against its plain twin and its teacher ensemble, like for like.

The student (role "student of <ensemble>") and its twin (same architecture, recipe,
images, epochs and seed, trained on the labels only) are in the runs file beside the
ensemble's members. On the reported split (val, never trained on or chosen on):

    kept = (E_twin - E_student) / (E_twin - E_ensemble)

the share of the ensemble's gain over the twin that the student keeps (Hinton et al. 2015
report 80% of it for their speech model), with a paired 95% bootstrap interval: every
resample draws the same rows for all three, as `ensemble.math.bootstrap_ci` does. The cost
ratio is the student's multiply-adds over the ensemble's (the sum over its members).
"""
from __future__ import annotations

import numpy as np
import torch

from ensemble import math as em
from orchestrator.base import storage
from orchestrator.records.runs_file import MemberRecord, RunsFile


def misses(probs, labels: torch.Tensor) -> dict[int, np.ndarray]:
    """Per-row top-1 and top-5 misses (1.0 a miss) by the platform's top-k rule."""
    rank = em.true_class_rank(probs, labels)
    return {k: (rank >= k).numpy().astype(np.float64) for k in (1, 5)}


def kept_share(twin: np.ndarray, student: np.ndarray, ensemble: np.ndarray, n_boot: int = 1000,
               seed: int = 0) -> tuple[float, float, float]:
    """(kept, lo, hi) from per-row misses; resamples whose ensemble gain is 0 are left out."""
    gain = twin.mean() - ensemble.mean()
    kept = (twin.mean() - student.mean()) / gain if gain else float("nan")
    rng, n = np.random.default_rng(seed), len(twin)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])
    got, whole = counts @ (twin - student) / n, counts @ (twin - ensemble) / n
    ratios = got[whole != 0] / whole[whole != 0]
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if len(ratios) else (float("nan"), float("nan"))
    return float(kept), float(lo), float(hi)


def _macs(records: list[MemberRecord]) -> float | None:
    if any("macs" not in r.metrics for r in records):
        return None
    return sum(r.metrics["macs"] for r in records)


def compare(runs: RunsFile, n_boot: int = 1000) -> list[dict]:
    """One comparison per finished student whose twin finished too."""
    by_role = {m.role: m for m in runs.members if m.role and m.status == "finished"}
    members = runs.ensemble_members()
    students = [m for role, m in by_role.items() if role.startswith("student of ")]
    if not students or not members:
        return []
    labels = torch.as_tensor(np.asarray(storage.read_npy(runs.dataset.labels), dtype=np.int64))
    ensemble = misses(em.combine([storage.read_npy(m.predictions) for m in members]), labels)
    out = []
    for student in students:
        twin = by_role.get(f"twin of {student.name}")
        if twin is None:
            continue
        s, t = (misses(storage.read_npy(m.predictions), labels) for m in (student, twin))
        row = {"student": student.name, "twin": twin.name, "members": len(members), "samples": len(labels)}
        for k in (1, 5):
            kept, lo, hi = kept_share(t[k], s[k], ensemble[k], n_boot)
            row[f"top{k}"] = {"student": s[k].mean(), "twin": t[k].mean(), "ensemble": ensemble[k].mean(),
                              "kept": kept, "lo": lo, "hi": hi}
        cost_s, cost_e = _macs([student]), _macs(members)
        row["cost_ratio"] = cost_s / cost_e if cost_s and cost_e else None
        out.append(row)
    return out


def lines(rows: list[dict]) -> list[str]:
    """`student E_s vs plain twin E_t vs ensemble E_e: keeps K% of the ensemble's gain over
    the twin [lo, hi], at C_s/C_e of its cost`, per metric."""
    out = []
    for row in rows:
        cost = f"at {row['cost_ratio']:.2f}x its multiply-adds" if row["cost_ratio"] else "cost not recorded"
        for k in (1, 5):
            r = row[f"top{k}"]
            kept = (f"keeps {r['kept']:.0%} of the ensemble's gain over the twin [{r['lo']:.0%}, {r['hi']:.0%}]"
                    if r["ensemble"] < r["twin"] else "the ensemble is no better than the twin: no gain to keep")
            out.append(f"top-{k} error: student {r['student']:.2%} vs plain twin {r['twin']:.2%} vs ensemble of "
                       f"{row['members']} {r['ensemble']:.2%}: {kept}, {cost}")
    return out


def log(runs: RunsFile, rows: list[dict]) -> None:
    """The figures as metrics of the job's parent run (distill_top1_kept, ...)."""
    if not rows or runs.mlflow is None or not runs.mlflow.parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    client, row = MlflowClient(runs.mlflow.tracking_uri), rows[0]
    for k in (1, 5):
        for what, value in row[f"top{k}"].items():
            if value == value:  # not NaN
                client.log_metric(runs.mlflow.parent_run_id, f"distill_top{k}_{what}", float(value))
