"""A distilled student against its plain twin and its teacher ensemble, like for like.

The student (role "student of <ensemble>") and its twin (same architecture, recipe,
images, epochs and seed, trained on the labels only) are in the runs file beside the
ensemble's members. On the reported split (val, never trained on or chosen on):

    kept = (E_twin - E_student) / (E_twin - E_ensemble)

the share of the ensemble's gain over the twin that the student keeps (Hinton et al. 2015
report 80% of it for their speech model), with a paired 95% bootstrap interval: every
resample draws the same rows for all three, as `ensemble.core.math.bootstrap_ci` does, and the
student's margin over its twin with its own interval. With one pair per seed, the last
figure pools them (each row's misses averaged over the seeds). The cost ratio is the
student's multiply-adds over the ensemble's (the sum over its members).
"""
from __future__ import annotations

import numpy as np
import torch

from ensemble.core import math as em
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
    got, whole = em.resampled_means(np.stack([twin - student, twin - ensemble], 1), n_boot, seed).T
    ratios = got[whole != 0] / whole[whole != 0]
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if len(ratios) else (float("nan"), float("nan"))
    return float(kept), float(lo), float(hi)


def _macs(records: list[MemberRecord]) -> float | None:
    if any("macs" not in r.metrics for r in records):
        return None
    return sum(r.metrics["macs"] for r in records)


def compare(runs: RunsFile, n_boot: int = 1000) -> list[dict]:
    """One comparison per finished student whose twin finished too and, with several such
    pairs (one per seed), a last one pooled over them: each row's misses averaged over the
    pairs, so seed-to-seed noise averages out and the paired interval narrows."""
    finished = [m for m in runs.members if m.role and m.status == "finished"]
    twins = {m.role: m for m in finished if m.role.startswith("twin of ")}
    members = runs.ensemble_members()
    pairs = [(m, twins[f"twin of {m.name}"]) for m in finished
             if m.role.startswith("student of ") and f"twin of {m.name}" in twins]
    if not pairs or not members:
        return []
    labels = torch.as_tensor(np.asarray(storage.read_npy(runs.dataset.labels), dtype=np.int64))
    ensemble = misses(em.combine([storage.read_npy(m.predictions) for m in members]), labels)
    cost_s, cost_e = _macs([pairs[0][0]]), _macs(members)
    common = {"members": len(members), "samples": len(labels),
              "cost_ratio": cost_s / cost_e if cost_s and cost_e else None}
    scored = [[misses(storage.read_npy(m.predictions), labels) for m in pair] for pair in pairs]
    rows = [_row(s, t, ensemble, n_boot, student=a.name, twin=b.name, pairs=1, **common)
            for (a, b), (s, t) in zip(pairs, scored)]
    if len(pairs) > 1:
        s, t = ({k: np.mean([p[i][k] for p in scored], axis=0) for k in (1, 5)} for i in (0, 1))
        rows.append(_row(s, t, ensemble, n_boot, student=f"{len(pairs)} students", twin=f"{len(pairs)} twins",
                         pairs=len(pairs), **common))
    return rows


def _row(s: dict, t: dict, ensemble: dict, n_boot: int, **fields) -> dict:
    row = dict(fields)
    for k in (1, 5):
        kept, lo, hi = kept_share(t[k], s[k], ensemble[k], n_boot)
        gap = em.bootstrap_ci((t[k] - s[k])[:, None], n_boot)[0]  # the twin-student difference, paired
        row[f"top{k}"] = {"student": s[k].mean(), "twin": t[k].mean(), "ensemble": ensemble[k].mean(),
                          "kept": kept, "lo": lo, "hi": hi, "beats_twin": t[k].mean() - s[k].mean(),
                          "beats_lo": gap[0], "beats_hi": gap[1]}
    return row


def lines(rows: list[dict]) -> list[str]:
    """`student E_s vs plain twin E_t vs ensemble E_e: keeps K% of the ensemble's gain over
    the twin [lo, hi], at C_s/C_e of its cost; the student beats its twin by D points [lo, hi]`,
    per metric."""
    out = []
    for row in rows:
        cost = f"at {row['cost_ratio']:.2f}x its multiply-adds" if row["cost_ratio"] else "cost not recorded"
        pooled = f", {row['pairs']} seeds pooled" if row["pairs"] > 1 else ""
        for k in (1, 5):
            r = row[f"top{k}"]
            kept = (f"keeps {r['kept']:.0%} of the ensemble's gain over the twin [{r['lo']:.0%}, {r['hi']:.0%}]"
                    if r["ensemble"] < r["twin"] else "the ensemble is no better than the twin: no gain to keep")
            beats = (f"the student beats its twin by {100 * r['beats_twin']:+.2f} points "
                     f"[{100 * r['beats_lo']:+.2f}, {100 * r['beats_hi']:+.2f}]")
            out.append(f"top-{k} error{pooled}: student {r['student']:.2%} vs plain twin {r['twin']:.2%} vs ensemble of "
                       f"{row['members']} {r['ensemble']:.2%}: {kept}, {cost}; {beats}")
    return out


def log(runs: RunsFile, rows: list[dict]) -> None:
    """The figures as metrics of the job's parent run (distill_top1_kept, ...): the pooled
    ones where there are several pairs."""
    if not rows or runs.mlflow is None or not runs.mlflow.parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    client, row = MlflowClient(runs.mlflow.tracking_uri), rows[-1]
    for k in (1, 5):
        for what, value in row[f"top{k}"].items():
            if value == value:  # not NaN
                client.log_metric(runs.mlflow.parent_run_id, f"distill_top{k}_{what}", float(value))
