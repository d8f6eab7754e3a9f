"""Searches end to end on CPU: ASHA on the embedded defaults (local Ray, SQLite MLflow,
local storage), PBT on the local stack (ray job submit, MLflow server, S3), each tracked
as a parent run with a child per trial, each ending in a runs file of chosen trials."""
from __future__ import annotations

import json
import re
import subprocess
import uuid

import numpy as np
import pytest
import s3fs
import yaml
from mlflow.tracking import MlflowClient

from ensemble.core.math import topk_error
from orchestrator.config import expand_env
from orchestrator.records.runs_file import load_runs
from tests.conftest import ROOT, run_cli
from tests.test_e2e import RUNTIME_EXCLUDES, assert_no_credentials, children_of, check_runs_file, s3_data  # noqa: F401


def search_config(tiny_root, tmp_path, name: str) -> tuple[str, dict]:
    raw = yaml.safe_load((ROOT / "configs" / "search" / name).read_text()
                         .replace("${DATA_ROOT:-../shared/data}/tiny-imagenet-200", tiny_root))
    raw["storage"]["path"] = str(tmp_path / "out")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "search-test"}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def summary(stdout: str) -> dict:
    m = re.search(r"(\d+) trials: (\d+) complete, (\d+) stopped early, (\d+) cloned by PBT", stdout)
    assert m, stdout[-3000:]
    return dict(zip(("trials", "complete", "stopped", "cloned"), map(int, m.groups())))


def test_asha_search_on_the_embedded_defaults_chooses_members(tiny_root, tmp_path):
    config, raw = search_config(tiny_root, tmp_path, "smoke.yaml")
    runs_path = tmp_path / "search-runs.yaml"
    out = run_cli("jobs/search.py", "--config", config, "--runs", str(runs_path), env={"RAY_ADDRESS": "local"},
                  timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = summary(out.stdout)
    assert counts["trials"] == 6 and counts["stopped"] >= 1  # ASHA stopped some trials early
    assert "top-k by own error" in out.stdout and "Caruana selection" in out.stdout

    runs = load_runs(str(runs_path))
    # Caruana's selection, 3 picks with replacement: at most 3 distinct trials, weighted by picks
    # (only trials that trained every epoch have final predictions)
    chosen = len(runs.members)
    assert 1 <= chosen <= min(3, counts["complete"]) and len({m.name for m in runs.members}) == chosen
    assert sum(m.weight for m in runs.members) <= 3 and all(m.weight >= 1 for m in runs.members)
    print(out.stdout[-2500:])
    labels = np.load(runs.dataset.labels)
    for m in runs.members:
        probs = np.load(m.predictions)
        assert probs.shape == (80, 10) and topk_error(probs, labels, 1) == pytest.approx(m.metrics["top1_err"])
        assert np.load(m.minival_predictions).shape == (40, 10)  # 4 per class, chosen on
    assert runs.minival.split == "train@minival:4:0" and runs.minival.samples == 40
    assert {c.what for c in runs.choices} >= {"the trials that became members"}
    assert all(c.split == runs.minival.split for c in runs.choices)  # nothing was chosen on val
    assert load_runs(str(tmp_path / "out" / raw["name"] / "runs-topk.yaml")).members

    client = MlflowClient(raw["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("search-test")
    parent = client.search_runs([exp.experiment_id], "tags.`ensemble.kind` = 'search'")[0]
    children = children_of(client, parent)
    assert len(children) == 6 and all(c.data.tags.get("trial.id") for c in children)
    for c in children:  # every epoch scored on the minival, never on val
        assert client.get_metric_history(c.info.run_id, "minival_top1_err")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/trials.csv", "search/lr_policies.png", "search/trial_curves.png",
            "search/parallel_coordinates.png"} <= artifacts
    assert {"greedy_top1_err", "topk_top1_err"} <= set(client.get_run(parent.info.run_id).data.metrics)

    # the chosen trials are members as they are: evaluated, and imported into an ensemble
    report = run_cli("-m", "ensemble.evaluate", "--members", str(runs_path), "--out", str(tmp_path / "report"),
                     "--json", str(tmp_path / "report.json"), "--no-mlflow", "--select", "greedy")
    assert report.returncode == 0, report.stderr[-2000:]
    protocol = json.loads((tmp_path / "report.json").read_text())["protocol"]
    assert protocol["chosen_on"].startswith("train@minival:4:0") and protocol["reported_on"] == "val: 80 rows"
    ens = {"name": "from-search", "data": raw["data"], "storage": raw["storage"], "mlflow": raw["mlflow"],
           "imported_runs": [str(runs_path)]}
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(ens))
    # nothing to train, so no Ray: an address where nothing listens would fail a job that started it
    trained = run_cli("jobs/train_ensemble.py", "--config", str(tmp_path / "ens.yaml"), "--runs",
                      str(tmp_path / "ens-runs.yaml"), env={"RAY_ADDRESS": "127.0.0.1:9"}, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-2000:]
    assert [m.name for m in load_runs(str(tmp_path / "ens-runs.yaml")).members] == [m.name for m in runs.members]


@pytest.mark.stack
def test_pbt_on_the_cluster_path_clones_the_donors_weights(stack, s3_data):  # noqa: F811
    run_id = uuid.uuid4().hex[:8]
    storage = f"s3://{stack['bucket']}/pbt-{run_id}"
    env = {"DATA_ROOT": s3_data, "ENSEMBLE_STORAGE": storage, "MLFLOW_EXPERIMENT": f"pbt-{run_id}"}
    out = subprocess.run(
        ["ray", "job", "submit", "--address", stack["dashboard"], "--working-dir", ".", "--runtime-env-json",
         json.dumps({"env_vars": env, "excludes": RUNTIME_EXCLUDES}), "--", "python", "jobs/search.py",
         "--config", "configs/search/pbt-smoke.yaml", "--runs", f"{storage}/search-runs.yaml"], cwd=ROOT,
        capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:]
    assert summary(out.stdout)["cloned"] >= 1 and "cloned the weights of trial" in out.stdout
    assert f"wrote {storage}/search-runs.yaml in " in out.stdout  # the URL it wrote, not a local copy's path
    assert load_runs(f"{storage}/search-runs.yaml").members

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name(f"pbt-{run_id}")
    parent = client.search_runs([exp.experiment_id], "tags.`ensemble.kind` = 'search'")[0]
    children = {c.data.tags["trial.id"]: c for c in children_of(client, parent)}
    assert len(children) == 2
    cloned = [c for c in children.values() if "pbt.cloned_from" in c.data.tags]
    assert cloned
    for c in cloned:
        donor, epoch = c.data.tags["pbt.cloned_from"].split("@")
        assert donor in children and donor != c.data.tags["trial.id"]
        donor_fp = {m.step: m.value for m in client.get_metric_history(children[donor].info.run_id, "fingerprint")}
        loaded = {m.step: m.value for m in client.get_metric_history(c.info.run_id, "cloned_fingerprint")}
        assert loaded[int(epoch)] == donor_fp[int(epoch)]  # the weights it continued from are the donor's
        steps = sorted({m.step for m in client.get_metric_history(c.info.run_id, "val_top1_err")})
        assert steps[-1] == 3  # and it went on to the last epoch

    runs = load_runs(f"{storage}/search-pbt-smoke/runs.yaml")
    # Caruana's selection, 2 picks with replacement (kept to the best prefix): 1 or 2 trials
    assert 1 <= len(runs.members) <= sum(m.weight for m in runs.members) <= 2
    check_runs_file(runs, len(runs.members), 10)
    # no minival here: the val rows that chose the members are recorded, and never reported
    rowed = [c for c in runs.choices if c.fraction]
    assert rowed and rowed[0].split == "val" and rowed[0].samples == 40
    assert any(c.what.startswith("Tune's metric") and c.split == "val" for c in runs.choices)
    assert s3fs.S3FileSystem().exists(runs.members[0].checkpoint)
    assert_no_credentials(client, [parent, *children.values()], [out.stdout + out.stderr])


def test_the_shipped_tiny_imagenet_search_trains_label_shuffled_on_the_streamed_split(tiny_root, tmp_path):
    """configs/search/tiny-imagenet-resnet.yaml as shipped (all of Tiny-ImageNet train,
    streamed, its minival carved out, label shuffling searched), with the overrides a CPU
    test needs: no GPU, one trial with label shuffling on, one epoch capped to a few steps,
    32 px, val and minival 2 images per class."""
    raw = yaml.safe_load(expand_env((ROOT / "configs" / "search" / "tiny-imagenet-resnet.yaml").read_text()
                                    .replace("${DATA_ROOT:-s3://ensembles/data}/tiny-imagenet-200", tiny_root)))
    assert raw["data"]["root"] == tiny_root and "classes" not in raw["data"] and "train_per_class" not in raw["data"]
    raw["storage"]["path"] = str(tmp_path / "out")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "shipped-search"}
    raw["data"]["val_per_class"] = 2  # scored once at the end: 400 images, not 10,000
    raw["data"]["minival"] = 2  # scored each epoch: 400 images held out of train, not 2,000
    raw["defaults"].update(input_size=32, resources={"use_gpu": False, "cpus_per_worker": 2, "loader_workers": 1})
    raw["recipes"]["base"].update(epochs=1, batch_size=32, max_steps_per_epoch=4, plain_last_epochs=0)
    raw["search"].update(num_samples=1)
    raw["search"]["space"]["recipe.label_shuffling"] = {"choice": [True]}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))

    out = run_cli("jobs/search.py", "--config", str(path), "--runs", str(tmp_path / "runs.yaml"),
                  env={"RAY_ADDRESS": "local"}, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert summary(out.stdout) == {"trials": 1, "complete": 1, "stopped": 0, "cloned": 0}
    client = MlflowClient(raw["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("shipped-search")
    parent = client.search_runs([exp.experiment_id], "tags.`ensemble.kind` = 'search'")[0]
    (trial,) = children_of(client, parent)
    # Hikvision's rule on the streamed rest of train: 200 classes x N = 498 (500 less 2 of minival)
    assert trial.data.tags["hikvision.label_shuffling"].startswith("label-shuffled epoch: 200 classes x 498 = 99600")
    assert client.get_metric_history(trial.info.run_id, "minival_top1_err")
    runs = load_runs(str(tmp_path / "runs.yaml"))
    assert np.load(runs.members[0].predictions).shape == (400, 200)


def test_parallel_coordinates_label_every_axis_with_its_values():
    """The search's parallel-coordinates plot: a wide numeric range on a log scale labelled
    at its ends, a few levels each labelled, categories by name, positions in [0, 1]."""
    from orchestrator.views.plots import parallel_axes

    rows = [{"lr": 0.05, "warmup": 0, "policy": "cosine", "aug": True, "err": 0.8},
            {"lr": 0.5, "warmup": 2, "policy": "onecycle", "aug": False, "err": 0.9},
            {"lr": 1.6, "warmup": 1, "policy": "cosine", "aug": False, "err": 0.85}]
    lr, warmup, policy, aug, err = parallel_axes(rows, ["lr", "warmup", "policy", "aug", "err"])
    assert [label for _, label in lr[1]] == ["0.05", "0.5", "1.6 (log)"]
    assert abs(lr[0][1] - 0.6644) < 1e-3  # log(0.5/0.05) / log(1.6/0.05)
    assert [label for _, label in warmup[1]] == ["0", "1", "2"] and warmup[0] == [0.0, 1.0, 0.5]
    assert [label for _, label in policy[1]] == ["cosine", "onecycle"] and policy[0] == [0.25, 0.75, 0.25]
    assert [label for _, label in aug[1]] == ["False", "True"]
    assert [label for _, label in err[1]] == ["0.8", "0.85", "0.9"]
    many = parallel_axes([{"x": float(v)} for v in range(1, 8)], ["x"])[0]
    assert [label for _, label in many[1]] == ["1", "7 (log)"]  # beyond 5 levels: the ends


def test_trial_curves_name_each_trial_by_its_searched_values(tmp_path):
    """The legend of trial_curves.png: the trial's short id, its policy and each searched
    value by its field's last name, and its final metric."""
    from orchestrator.views.plots import plot_trials, trial_label

    overrides = {"recipe.schedule.policy": "onecycle", "recipe.optimizer.lr": 0.03412,
                 "recipe.augment.overrides.mixup_alpha": 0.2, "recipe.label_shuffling": True}
    label = trial_label("search_trial_dc9e3_00002", overrides, 0.775)
    assert label == "00002: onecycle, lr 0.0341, mixup_alpha 0.2, label_shuffling True -> 0.775"
    assert trial_label("t_1", {"recipe.optimizer.lr": 0.1}) == "1: lr 0.1"
    from orchestrator.config.search_space import in_effect  # a policy parameter its policy does not take is not named

    sampled = {"recipe.schedule.policy": "cosine", "recipe.schedule.params.power": 2.0, "recipe.optimizer.lr": 0.1}
    assert in_effect(sampled) == {"recipe.schedule.policy": "cosine", "recipe.optimizer.lr": 0.1}
    assert in_effect({**sampled, "recipe.schedule.policy": "poly"})["recipe.schedule.params.power"] == 2.0
    histories = {"a": [{"epoch": 1, "e": 0.9}, {"epoch": 2, "e": 0.8}], "b": [{"epoch": 1, "e": 0.95}]}
    plot_trials(str(tmp_path / "t.png"), histories, "e", {"a": "a: best", "b": "b: stopped"})
    assert (tmp_path / "t.png").stat().st_size > 10_000
