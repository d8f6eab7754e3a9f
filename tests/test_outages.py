"""What ends a run on an outage: which failures name a server (and which are bugs that
keep their traceback), the one line and exit status, the retry budget it states."""
import pytest

from orchestrator.base.outages import exit_on_outage, tracking_budget_s, which_server


def test_a_connection_that_outlived_its_retries_names_its_server(monkeypatch):
    from botocore.exceptions import EndpointConnectionError
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    down = MlflowException("API request to http://127.0.0.1:5055/api/2.0/mlflow/runs/log-batch failed with exception "
                           "HTTPConnectionPool(host='127.0.0.1', port=5055): Max retries exceeded with url: ...")
    assert which_server(down) == "the MLflow tracking server at http://127.0.0.1:5055"
    s3 = EndpointConnectionError(endpoint_url="http://127.0.0.1:8333/ensembles")
    assert which_server(s3) == "the object store at http://127.0.0.1:8333"
    try:  # a cause further down the chain counts too
        try:
            raise s3
        except EndpointConnectionError as exc:
            raise RuntimeError("upload failed") from exc
    except RuntimeError as wrapped:
        assert which_server(wrapped) == "the object store at http://127.0.0.1:8333"
    for bug in (ValueError("bad"), FileNotFoundError("x"), OSError(24, "Too many open files"), KeyError("k")):
        assert which_server(bug) is None  # not an outage: the traceback stays
    # Ray's storage: pyarrow's S3 filesystem, its error the cause of a Tune trial's error
    pyarrow_down = OSError("When initiating multiple part upload for key 'tune/x' in bucket 'ensembles': AWS Error "
                           "NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Couldn't connect")
    trial = RuntimeError("trial failed")
    trial.cause = pyarrow_down
    assert which_server(trial) == "the object store at http://127.0.0.1:8333"


def test_rays_s3_attempts_fit_the_storage_retry_budget(monkeypatch):
    from orchestrator.base.storage import s3_attempts

    monkeypatch.delenv("S3_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("STORAGE_RETRY_SECONDS", raising=False)
    assert s3_attempts() == 15  # 300 s
    monkeypatch.setenv("STORAGE_RETRY_SECONDS", "3")
    assert s3_attempts() == 1  # a test's short budget is not stretched to minutes by Ray's syncs
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "4")
    assert s3_attempts() == 4


def test_an_outage_is_one_line_exit_1_and_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    assert tracking_budget_s() == 2 + 4 + 8

    @exit_on_outage(lambda: "Kept: everything.")
    def main():
        raise MlflowException("API request to http://127.0.0.1:5055/api/2.0/x failed with exception "
                              "ConnectionError: Max retries exceeded")

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the MLflow tracking server at http://127.0.0.1:5055 stayed "
                                               "down past its retry budget, about 14 s")
    assert "Kept: everything." in err[0]
    log = err[0].rsplit("Traceback: ", 1)[1]
    assert "MlflowException" in open(log).read() and log.startswith(str(tmp_path / "logs"))

    @exit_on_outage(lambda: "")
    def buggy():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        buggy()
