"""Records written by the version before the folder-per-layer layout still work
(tests/fixtures/old-records: a two-member job of `fixture.yaml` as that version wrote it,
its runs.yaml, stored member records and predictions, its MLflow store, and one member's
in-progress checkpoint after epoch 1; the finished members' final weights are left out
for size, a device call carries the tree): the runs file evaluates to the same figures, a
re-run of the job trains nothing and keeps its MLflow runs, and the checkpoint resumes, with
the job's folder and its data both moved (member keys hash the data root they trained on)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.config import JobContext, MemberWork, load_config, resolve_members
from orchestrator.records.moved import keys_after_a_move
from orchestrator.records.runs_file import load_runs
from orchestrator.runtime import in_trial
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "old-records"
WRITTEN_AT = "/tmp/v1fix/run"  # where the old version wrote it
DATA_AT = "/work/shared/data/tiny-imagenet-200"
# what the old version printed for this job's ensemble (its job log)
OLD_LINE = "top-1 error: ensemble 56.25% vs best member vgg8-s1 75.00% (chosen on the minival)"


def relocated(tmp_path: Path, tiny_root: str) -> Path:
    """The fixture copied to tmp_path, its paths (files and the MLflow store) moved there,
    and its data found at another root (`moved_data`): a job's folder moved to another
    machine. The user's runs file is pointed at the data's new root; the job's stored copy
    keeps the root it trained on."""
    dst = tmp_path / "old"
    shutil.copytree(FIXTURE, dst)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny-imagenet-200").symlink_to(tiny_root)
    for f in [*dst.rglob("*.yaml"), *dst.rglob("*.json")]:
        f.write_text(f.read_text().replace(WRITTEN_AT, str(dst)))
    user_runs = dst / "runs.yaml"
    user_runs.write_text(user_runs.read_text().replace(DATA_AT, moved_data(dst)))
    db = sqlite3.connect(dst / "mlruns" / "mlflow.db")
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        for _, column, kind, *_ in db.execute(f"PRAGMA table_info({table})").fetchall():
            if "CHAR" in kind.upper() or "TEXT" in kind.upper():
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (WRITTEN_AT, str(dst)))
    db.commit()
    db.close()
    return dst


def moved_data(dst: Path) -> str:
    return str(dst.parent / "data" / "tiny-imagenet-200")


def run(dst: Path, tiny_root: str, *args: str) -> subprocess.CompletedProcess:
    # the job's own folder (./mlruns, as it was written), not a tracking server the environment names
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(DATA_ROOT=str(dst.parent / "data"), ENSEMBLE_STORAGE=str(dst / "storage"))
    return subprocess.run([sys.executable, *args], cwd=dst, env=env, capture_output=True, text=True, timeout=600)


def test_an_old_runs_file_still_evaluates_to_the_same_figures(tmp_path, tiny_root):
    dst = relocated(tmp_path, tiny_root)
    runs = load_runs(str(dst / "runs.yaml"))
    assert [m.name for m in runs.members] == ["resnet20-s0", "vgg8-s1"] and runs.minival.split == "train@minival:2:0"
    out = run(dst, tiny_root, "-m", "ensemble.evaluate", "--members", "runs.yaml", "--out", "report")
    assert out.returncode == 0, out.stderr[-2000:]
    assert OLD_LINE in out.stdout


def test_an_old_job_reruns_without_training_and_keeps_its_mlflow_runs(tmp_path, tiny_root):
    dst = relocated(tmp_path, tiny_root)
    parent = yaml.safe_load((dst / "runs.yaml").read_text())["mlflow"]["parent_run_id"]
    out = run(dst, tiny_root, str(ROOT / "jobs" / "train_ensemble.py"), "--config", "fixture.yaml", "--runs", "again.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 already finished, 0 to train" in out.stdout and OLD_LINE in out.stdout
    assert "resnet20-s0: kept its record resnet20-s0-13d79748 (trained on /work/shared/data/" in out.stdout
    again = load_runs(str(dst / "again.yaml"))
    assert again.mlflow.parent_run_id == parent  # the old parent run, not a new one
    old = load_runs(str(dst / "runs.yaml"))
    assert [m.model_dump() for m in again.members] == [m.model_dump() for m in old.members]


def test_an_old_checkpoint_resumes(tmp_path, tiny_root, capsys, monkeypatch):
    dst = relocated(tmp_path, tiny_root)
    monkeypatch.setenv("DATA_ROOT", str(dst.parent / "data"))
    monkeypatch.setenv("ENSEMBLE_STORAGE", str(dst / "storage"))
    cfg = load_config(str(dst / "fixture.yaml"))
    ctx = JobContext(ensemble=cfg.name, storage=str(dst / "storage"), data=cfg.data, tracking_uri="",
                     experiment_id="", parent_run_id="")
    fresh = resolve_members(cfg)[0]
    member = keys_after_a_move(cfg, resolve_members(cfg), ctx)[0][0]
    assert fresh.key != member.key == "resnet20-s0-13d79748"  # the data root moved; the key it trained under is kept
    root = dst / "storage" / "old-records" / "train" / member.key
    assert json.loads((root / "latest.json").read_text())["epoch"] == 1
    longer = member.model_copy(update={"recipe": member.recipe.model_copy(update={"epochs": 2})})
    final, uri = in_trial.run_here(MemberWork(member=longer, data=cfg.data), str(root), 0, progress=lambda m: None)
    assert "resuming after epoch 1" in capsys.readouterr().out  # epoch 1 came from the old checkpoint
    assert final["epoch"] == 2 and uri.endswith("epoch_0002")
