"""What a new user meets first: bad input answered in one line that says where, help that
reads to its end."""
import pytest

from ensemble import evaluate
from orchestrator.config import load_config
from orchestrator.data.manifest import load_manifest
from orchestrator.base.errors import UserError
from tests.conftest import ROOT, run_cli


def evaluate_error(path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--members", str(path), "--no-mlflow"])
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_empty_runs_file_says_what_it_should_hold(tmp_path, capsys):
    (tmp_path / "runs.yaml").write_text("")
    assert evaluate_error(tmp_path / "runs.yaml", capsys) == \
        f"error: {tmp_path / 'runs.yaml'} must be a mapping with version, ensemble, dataset and members; it holds nothing"


def test_yaml_syntax_errors_name_the_line(tmp_path, capsys):
    (tmp_path / "runs.yaml").write_text("version: 1\nensemble: [a, b\nmembers: []\n")
    line = evaluate_error(tmp_path / "runs.yaml", capsys)
    assert "is not valid YAML: line 3, column 8" in line
    (tmp_path / "c.yaml").write_text("name: x\ndata:\n  root: /d\n   classes: 3\n")
    with pytest.raises(UserError, match=r"is not valid YAML: line 4, column \d+"):
        load_config(str(tmp_path / "c.yaml"))


def test_a_missing_data_folder_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match=f"data folder not found: {tmp_path / 'nowhere'}"):
        load_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no manifest.json"):
        load_manifest(str(tmp_path / "empty"))


def test_plan_help_reads_to_the_end_of_its_sentence():
    out = run_cli("-m", "orchestrator.planning.plan", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "where each member of an ensemble would run on a given cluster, for how long, and at what cost, " \
           "before anything is launched." in text


def test_the_report_folder_is_ignored_by_git():
    assert "ensemble-report/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_experiment_carries_a_saved_runs_view_the_ui_can_open(tmp_path):
    """The link the job prints opens the runs table on a view stored in the experiment (as
    the UI's Share button stores one): sorted by val top-5 error, with the columns to compare."""
    import json

    from mlflow.tracking import MlflowClient

    from orchestrator.views.tracking import RUNS_VIEW, VIEW_KEY, get_experiment_id, runs_view_url

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = get_experiment_id(client, "e")
    assert get_experiment_id(client, "e") == exp  # a second job reuses it
    tags = client.get_experiment(exp).tags
    view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view == RUNS_VIEW and view["orderByKey"] == "metrics.`val_top5_err`" and view["orderByAsc"] is True
    assert "metrics.`val_top1_err`" in view["selectedColumns"]
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_view_url("http://127.0.0.1:5000/", exp) == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?viewStateShareKey=ensembles&workflowType=machine_learning")
    from orchestrator.views.tracking import run_page_url

    assert run_page_url("http://127.0.0.1:5000/", exp, "abc") == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs/abc?workflowType=machine_learning")
    import os

    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # MLflow's GenAI-view links are off


def test_errors_and_images_per_s_are_logged_as_the_digits_that_mean_something():
    from orchestrator.views.tracking import _shown

    assert _shown("val_top1_err", 0.6620000004768372) == 0.662
    assert _shown("fingerprint", 172085.55761317757) == 172085.55761317757  # compared for equality
    assert _shown("images_per_s", 256.608179) == 256.6 and _shown("images_per_s", 25123.4) == 25120
