"""Several student/twin pairs in one job (`distill.student.seed` a list): each pair its
own seed and role, students first; the job's figure pooled over the pairs, each val row's
misses averaged, checked against a hand computation on stored predictions."""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from ensemble.core import distilled
from orchestrator.base.errors import UserError
from orchestrator.config import parse_config, resolve_students
from orchestrator.records.runs_file import load_runs
from tests.test_distill_job import CONFIG
from tests.test_evaluate import EVAL


def config(tiny_root, **student):
    raw = yaml.safe_load(yaml.safe_dump(CONFIG).replace("${DATA_ROOT}", os.path.dirname(tiny_root)))
    raw["distill"]["student"].update(student)
    return parse_config(raw)


def test_a_seed_list_gives_one_student_and_twin_per_seed_students_first(tiny_root):
    got = resolve_students(config(tiny_root, seed=[3, 1]), "runs.yaml", ["a", "b"])
    assert [(m.name, m.seed, m.role) for m in got] == [
        ("student-resnet20-s3", 3, "student of distill-smoke"), ("student-resnet20-s1", 1, "student of distill-smoke"),
        ("student-resnet20-s3-twin", 3, "twin of student-resnet20-s3"),
        ("student-resnet20-s1-twin", 1, "twin of student-resnet20-s1")]
    assert len({m.key for m in got}) == 4
    named = resolve_students(config(tiny_root, seed=[0, 2], name="pupil"), "runs.yaml", ["a"])
    assert [m.name for m in named] == ["pupil-s0", "pupil-s2", "pupil-s0-twin", "pupil-s2-twin"]
    one = resolve_students(config(tiny_root, seed=5), "runs.yaml", ["a"])  # one seed: the names as before
    assert [m.name for m in one] == ["student-resnet20-s5", "student-resnet20-s5-twin"]
    with pytest.raises(UserError, match=r"distill.student.seed \[1, 1\]: give one seed or a list of different seeds"):
        resolve_students(config(tiny_root, seed=[1, 1]), "runs.yaml", ["a"])


def runs_with_pairs(folder, n=400, c=10, pairs=3):
    """Two members and `pairs` student/twin pairs of random skill on `n` rows."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, n)
    np.save(folder / "labels.npy", labels)

    def net(name, skill, **extra):
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), labels] += skill
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.save(folder / f"{name}.npy", probs.astype(np.float32))
        return {"name": name, "key": name, "arch": "resnet20", "predictions": str(folder / f"{name}.npy"),
                "eval": EVAL, "metrics": {"macs": 4e7 if "role" in extra else 8e7}, **extra}

    members = [net("m0", 1.5), net("m1", 1.6)]
    students = [net(f"s{i}", 1.4 + 0.1 * i, role="student of t") for i in range(pairs)]
    twins = [net(f"s{i}-twin", 1.2, role=f"twin of s{i}") for i in range(pairs)]
    runs = {"version": 1, "ensemble": "t", "members": members + students + twins,
            "dataset": {"name": "synthetic", "uri": str(folder), "split": "val", "num_classes": c, "samples": n,
                        "labels": str(folder / "labels.npy")}}
    (folder / "runs.yaml").write_text(yaml.safe_dump(runs))
    return load_runs(str(folder / "runs.yaml")), labels


def top1_misses(path, labels):
    return (np.load(path).argmax(1) != labels).astype(np.float64)


def test_pairs_are_compared_one_by_one_then_pooled_over_the_seeds(tmp_path):
    runs, labels = runs_with_pairs(tmp_path)
    rows = distilled.compare(runs, n_boot=200)
    assert [(r["student"], r["twin"], r["pairs"]) for r in rows] == [
        ("s0", "s0-twin", 1), ("s1", "s1-twin", 1), ("s2", "s2-twin", 1), ("3 students", "3 twins", 3)]
    s = np.mean([top1_misses(tmp_path / f"s{i}.npy", labels) for i in range(3)], axis=0)
    t = np.mean([top1_misses(tmp_path / f"s{i}-twin.npy", labels) for i in range(3)], axis=0)
    ens = (((np.load(tmp_path / "m0.npy") + np.load(tmp_path / "m1.npy")) / 2).argmax(1) != labels).mean()
    pooled = rows[-1]["top1"]
    assert pooled["student"] == pytest.approx(s.mean()) and pooled["twin"] == pytest.approx(t.mean())
    assert pooled["ensemble"] == pytest.approx(ens)
    assert pooled["kept"] == pytest.approx((t.mean() - s.mean()) / (t.mean() - ens))
    assert pooled["beats_twin"] == pytest.approx(t.mean() - s.mean())
    assert pooled["beats_lo"] < pooled["beats_twin"] < pooled["beats_hi"]
    # each pair's interval is wider than the pooled one: three seeds' rows averaged
    widths = [r["top1"]["beats_hi"] - r["top1"]["beats_lo"] for r in rows]
    assert widths[-1] < min(widths[:-1])
    assert rows[-1]["cost_ratio"] == pytest.approx(4e7 / 16e7)
    last = distilled.lines(rows)[-2]
    assert last.startswith(f"top-1 error, 3 seeds pooled: student {s.mean():.2%} vs plain twin {t.mean():.2%}")
    assert last.endswith(f"the student beats its twin by {100 * (t.mean() - s.mean()):+.2f} points "
                         f"[{100 * pooled['beats_lo']:+.2f}, {100 * pooled['beats_hi']:+.2f}]")
