"""Single-worker members trained in their trial process (no Ray Train, no MLflow here):
checkpoints on storage that a restart or a re-run resumes from, retries like Ray
Train's FailureConfig, and none for an error that would recur."""
import json
import os

import numpy as np
import pytest
import torch

from models import build_model
from models.cost import multiply_adds
from orchestrator.records.member import member_record
from orchestrator.runtime import in_trial
from orchestrator.config import MemberWork, resolve_members
from orchestrator.train import loop
from tests.test_core import core_config


def member_config(tiny_root, tmp_path, **recipe):
    cfg = core_config(tiny_root, **{"epochs": 2, **recipe})
    member = resolve_members(cfg)[0]
    return member, MemberWork(member=member, data=cfg.data), str(tmp_path / "train" / member.key)


def test_a_failed_attempt_resumes_from_the_latest_checkpoint(tiny_root, tmp_path, monkeypatch, capsys):
    member, config, root = member_config(tiny_root, tmp_path)
    reported, failed = [], []
    real_report = in_trial.TrialSession.report

    def flaky_report(self, metrics, folder):
        if metrics["epoch"] == 2 and not failed:
            failed.append(True)
            raise RuntimeError("node went away")  # after epoch 2's work, before its checkpoint
        real_report(self, metrics, folder)

    monkeypatch.setattr(in_trial.TrialSession, "report", flaky_report)
    final, uri = in_trial.run_here(config, root, max_failures=1, progress=reported.append)
    out = capsys.readouterr().out
    assert "RuntimeError: node went away; retrying from its latest checkpoint (1/1)" in out
    assert "resuming after epoch 1" in out  # epoch 1 was not trained again
    assert [r["epoch"] for r in reported] == [1, 2]
    assert final["epoch"] == 2 and uri == os.path.join(root, "epoch_0002")
    # only the latest checkpoint is kept, and it holds the member's val predictions
    assert sorted(os.listdir(root)) == ["epoch_0002", "latest.json"]
    assert sorted(os.listdir(uri)) == ["labels.npy", "model.pt", "predictions.npy"]
    assert np.load(os.path.join(uri, "predictions.npy")).shape == (16, 4)
    assert json.load(open(os.path.join(root, "latest.json")))["epoch"] == 2
    state = torch.load(os.path.join(uri, "model.pt"), map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_a_finished_member_is_not_trained_again(tiny_root, tmp_path, capsys):
    member, config, root = member_config(tiny_root, tmp_path, epochs=1)
    first, uri = in_trial.run_here(config, root, max_failures=0, progress=lambda m: None)
    capsys.readouterr()
    again = []
    second, uri2 = in_trial.run_here(config, root, max_failures=0, progress=again.append)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert again == [] and uri2 == uri and second == first
    # a per-member figure: measured at the end of training, kept on the member's record
    net = build_model(member.arch, num_classes=4, low_res=member.low_res)
    assert first["params"] == sum(p.numel() for p in net.parameters()) > 0
    assert member_record(member, None, final=first).metrics["params"] == first["params"]
    # ... and what it costs to run (models/cost.py), measured where it trained
    record = member_record(member, None, final=first)
    assert record.metrics["macs"] == multiply_adds(member.arch, member.low_res, member.input_size, 4) > 0
    assert record.metrics["infer_ms_b1"] > 0 and record.metrics["infer_images_per_s_b64"] > 0
    assert record.cost_machine.startswith("cpu: ")


def test_an_upload_cut_short_leaves_the_previous_checkpoint_in_charge(tiny_root, tmp_path, monkeypatch):
    member, config, root = member_config(tiny_root, tmp_path)
    real_put = in_trial.storage.put_dir

    def put_then_die(folder, uri):
        real_put(folder, uri)
        if uri.endswith("epoch_0002"):
            raise KeyboardInterrupt  # the process dies after the upload, before the pointer

    monkeypatch.setattr(in_trial.storage, "put_dir", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        in_trial.run_here(config, root, max_failures=3, progress=lambda m: None)
    session = in_trial.TrialSession(member, root)
    state, source = session.resume()
    assert state["epoch"] == 1 and source.endswith("epoch_0001")


def test_a_diverging_member_is_not_retried(tiny_root, tmp_path, capsys):
    member, config, root = member_config(tiny_root, tmp_path, optimizer={"name": "sgd", "lr": 1.0e12})
    with pytest.raises(loop.NonFiniteLoss):
        in_trial.run_here(config, root, max_failures=3, progress=lambda m: None)
    assert "retrying" not in capsys.readouterr().out


KILLED_MEMBER = """
import os, sys
from orchestrator.runtime import in_trial
from orchestrator.runtime.member_worker import run_member
from tests.test_in_trial import member_config

tiny_root, tmp, uri, run_id, window = sys.argv[1:]
member, config, root = member_config(tiny_root, __import__("pathlib").Path(tmp), epochs=3)
config = config.model_copy(update={'tracking_uri': uri, 'mlflow_run_id': run_id})


class Killed(in_trial.TrialSession):
    def report(self, metrics, folder):
        if metrics["epoch"] == 2 and window == "before the save":
            os.kill(os.getpid(), 9)
        super().report(metrics, folder)
        if metrics["epoch"] == 2 and window == "after the save":
            os.kill(os.getpid(), 9)


run_member(config, Killed(member, root, progress=lambda metrics: None))
"""


@pytest.mark.parametrize("window", ["before the save", "after the save"])
def test_a_member_killed_around_its_checkpoint_logs_every_epoch_once(tiny_root, tmp_path, window):
    """SIGKILL in the epoch's checkpoint window, then a restart: the member run's metric
    history holds each epoch exactly once (logged after the save; a saved epoch whose log
    the kill cut off is logged on resume from the checkpoint's history)."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("kill")).info.run_id
    args = [sys.executable, "-c", KILLED_MEMBER, tiny_root, str(tmp_path), uri, run_id]
    first = subprocess.run(args + [window], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-2000:]
    again = subprocess.run(args + ["no kill"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed_after = 2 if window == "after the save" else 1
    assert f"resuming after epoch {resumed_after}" in again.stdout
    for key in ("epoch", "train_loss", "val_top1_err"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key


def test_a_kept_members_predictions_are_written_once_where_they_are_kept(tiny_root, tmp_path, monkeypatch):
    """A job's member (`MemberWork.final_uri`) writes its prediction files once, to where its
    record points, and logs those same files to its MLflow run: no copy rides in the training
    checkpoint to be written again when the member is finalised."""
    from mlflow.tracking import MlflowClient

    from ensemble.core.math import topk_error

    member, work, root = member_config(tiny_root, tmp_path, epochs=1)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    exp = client.create_experiment("once", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    final_uri = str(tmp_path / "members" / member.key)
    work = work.model_copy(update={"final_uri": final_uri, "tracking_uri": tracking,
                                   "mlflow_run_id": run_id})
    written = []
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda path, array: (written.append(os.path.basename(path)),
                                                         real_save(path, array)))
    final, uri = in_trial.run_here(work, root, max_failures=0, progress=lambda m: None)
    assert sorted(written) == ["labels.npy", "predictions.npy"]  # each once
    assert sorted(os.listdir(uri)) == ["model.pt"]  # the checkpoint: weights and state only
    assert sorted(os.listdir(final_uri)) == ["labels.npy", "predictions.npy"]
    preds, labels = np.load(os.path.join(final_uri, "predictions.npy")), np.load(os.path.join(final_uri, "labels.npy"))
    assert final["val_top1_err"] == topk_error(preds, labels, 1)  # the record's error is the stored rows'
    logged = {f.path for f in client.list_artifacts(run_id, "predictions")}
    assert logged == {"predictions/predictions.npy", "predictions/labels.npy"}
    local = client.download_artifacts(run_id, "predictions/predictions.npy", str(tmp_path))
    assert np.array_equal(np.load(local), preds)
