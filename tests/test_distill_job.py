"""The distill step as users run it: `jobs/train_ensemble.py` with a `distill:` section on
the embedded defaults trains the members, then a student of their ensemble and its plain
twin, records both with their roles (out of the ensemble), and ends with the like-for-like
lines; a re-run trains nothing."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ensemble.core.evaluation import evaluate
from ensemble.core.options import EvaluateOptions
from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT

CONFIG = {
    "name": "distill-smoke",
    "data": {"root": "${DATA_ROOT}/tiny-imagenet-200", "classes": 8, "train_per_class": 18, "val_per_class": 10,
             "minival": 2, "shares": 2},
    "storage": {"path": "./outputs"},
    "mlflow": {"experiment": "distill-smoke"},
    "recipes": {"tiny": {"epochs": 2, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.2},
                         "augment": {"preset": "light"}}},
    "defaults": {"input_size": 32, "recipe": "tiny",
                 "resources": {"workers": 1, "cpus_per_worker": 0.75, "loader_workers": 0}},
    "members": [{"arch": "resnet20", "seed": 0}, {"arch": "vgg8", "seed": 1}],
    "distill": {"student": {"arch": "resnet20", "recipe": "tiny", "seed": 5}, "temperature": 4.0, "alpha": 0.9},
}


def job(tmp_path, tiny_root) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(RAY_ADDRESS="local", DATA_ROOT=os.path.dirname(tiny_root))
    return subprocess.run(["python", str(ROOT / "jobs" / "train_ensemble.py"), "--config", "distill.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_a_distill_job_trains_a_student_and_its_twin_after_the_members(tmp_path, tiny_root):
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(CONFIG))
    out = job(tmp_path, tiny_root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "distillation: student-resnet20-s5, student-resnet20-s5-twin (T 4, alpha 0.9) from 2 members" in out.stdout
    assert "member student-resnet20-s5: distilled from 2 members of" in out.stdout
    # the ensemble the job reports is its members' alone
    assert "ensemble of 2 finished members (mean softmax)" in out.stdout
    last = out.stdout.strip().splitlines()[-2:]  # the job's last lines, one per metric
    for k, line in zip((1, 5), last):
        assert re.fullmatch(rf"  top-{k} error: student [\d.]+% vs plain twin [\d.]+% vs ensemble of 2 [\d.]+%: "
                            rf"(keeps -?[\d.]+% of the ensemble's gain over the twin \[-?[\d.]+%, -?[\d.]+%\]|"
                            rf"the ensemble is no better than the twin: no gain to keep), "
                            rf"at 0\.\d\dx its multiply-adds; "
                            rf"the student beats its twin by [+-][\d.]+ points \[[+-][\d.]+, [+-][\d.]+\]", line), line

    runs = load_runs(str(tmp_path / "runs.yaml"))
    roles = {m.name: m.role for m in runs.members}
    assert roles == {"resnet20-tiny-s0": None, "vgg8-tiny-s1": None, "student-resnet20-s5": "student of distill-smoke",
                     "student-resnet20-s5-twin": "twin of student-resnet20-s5"}
    student, twin = runs.members[2], runs.members[3]
    assert student.recipe == "tiny+distill" and twin.recipe == "tiny" and student.seed == twin.seed == 5
    assert student.metrics["macs"] == twin.metrics["macs"] > 0  # costed like any member
    # the student trained on all of train but the minival (no share), as its twin
    assert student.metrics["images_per_s"] > 0 and "trains on share" not in _lines_of(out.stdout, "student-")
    # out of the ensemble, best-member choice and selection unless asked
    assert [m.name for m in evaluate(runs, EvaluateOptions(log_mlflow=False, bootstrap=0)).members] == \
        ["resnet20-tiny-s0", "vgg8-tiny-s1"]
    assert len(evaluate(runs, EvaluateOptions(log_mlflow=False, bootstrap=0, with_students=True)).members) == 4
    alone = evaluate(runs, EvaluateOptions(log_mlflow=False, bootstrap=0, only=["student-resnet20-s5"]))
    assert [m.name for m in alone.members] == ["student-resnet20-s5"]  # scored (and with --log-model served) alone
    assert alone.ensemble.top1_err == pytest.approx(student.metrics["top1_err"], abs=1e-6)  # float32 in the record
    client = MlflowClient(runs.mlflow.tracking_uri)
    children = client.search_runs([client.get_run(runs.mlflow.parent_run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{runs.mlflow.parent_run_id}'")
    assert {r.data.tags.get("member.role") for r in children} == {None, "student of distill-smoke",
                                                                   "twin of student-resnet20-s5"}
    assert "distill_top1_kept" in client.get_run(runs.mlflow.parent_run_id).data.metrics

    again = job(tmp_path, tiny_root)  # a re-run: the members, the student and the twin all kept
    assert again.returncode == 0 and "2 already finished, 0 to train" in again.stdout
    assert "running up to" not in again.stdout and again.stdout.strip().splitlines()[-2:] == last


def _lines_of(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if name in line)
