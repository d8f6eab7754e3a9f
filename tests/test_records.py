"""A run's records are its own, on the real stack: the MLflow parent run of a job is found
by ensemble name, kind and storage root (another storage path is another run); one job per
ensemble and storage path at a time (a lease in storage); a bucket missing before the job
is refused, not created by the first write."""
from __future__ import annotations

import subprocess
import time
import uuid

import boto3
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.base import storage
from orchestrator.views import tracking
from orchestrator.base.errors import UserError
from orchestrator.base.lease import Lease, lease_uri
from tests.conftest import run_cli

pytestmark = pytest.mark.stack


def test_another_storage_path_is_another_run_and_the_same_one_resumes_it(stack):
    client = MlflowClient(stack["mlflow"])
    experiment = tracking.get_experiment_id(client, f"records-{uuid.uuid4().hex[:8]}")
    first = tracking.get_or_create_parent(client, experiment, "ens", {}, storage="s3://ensembles/a")
    other = tracking.get_or_create_parent(client, experiment, "ens", {}, storage="s3://ensembles/b")
    again = tracking.get_or_create_parent(client, experiment, "ens", {}, storage="s3://ensembles/a")
    assert first == again != other
    assert client.get_run(other).data.tags[tracking.STORAGE_TAG] == "s3://ensembles/b"
    # a parent an earlier version created (no storage tag) is resumed under the root its
    # storage.path param names, and only there
    old = client.create_run(experiment, tags={tracking.PARENT_TAG: "old", "ensemble.kind": "parent"}).info.run_id
    client.log_param(old, "storage.path", "s3://ensembles/c")
    assert tracking.get_or_create_parent(client, experiment, "old", {}, storage="s3://ensembles/elsewhere") != old
    assert tracking.get_or_create_parent(client, experiment, "old", {}, storage="s3://ensembles/c") == old
    assert client.get_run(old).data.tags[tracking.STORAGE_TAG] == "s3://ensembles/c"


def test_a_second_job_on_the_same_storage_is_refused_with_one_line(stack, tiny_root):
    root = f"s3://{stack['bucket']}/records-{uuid.uuid4().hex[:8]}"
    env = {"ENSEMBLE_STORAGE": root, "DATA_ROOT": str(__import__("pathlib").Path(tiny_root).parent)}
    with Lease(root, "smoke", "raysubmit_first"):  # the first job, still running
        out = run_cli("jobs/train_ensemble.py", "--config", "configs/smoke.yaml", env=env, timeout=120)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "already being trained under this storage path: job raysubmit_first" in lines[0]
        assert lease_uri(root, "smoke") in lines[0]
    assert storage.read_json(lease_uri(root, "smoke")) is None  # released when the first job ends
    # a lease its driver stopped renewing (a lost node) is free after the TTL; one whose
    # driver on this host is gone (killed) at once
    stale = Lease(root, "smoke")
    storage.write_json(stale.uri, {**stale.me, "host": "lost-node", "renewed": time.time() - 3600})
    with Lease(root, "smoke"):
        pass
    gone = subprocess.Popen(["true"])
    gone.wait()
    storage.write_json(stale.uri, {**stale.me, "pid": gone.pid, "renewed": time.time()})
    with Lease(root, "smoke"):
        pass
    storage.write_json(stale.uri, {**stale.me, "host": "another-node", "renewed": time.time()})
    with pytest.raises(UserError, match="already being trained"):
        Lease(root, "smoke").acquire()
    storage.remove(stale.uri)


def test_a_bucket_missing_before_the_job_is_refused_unless_the_config_creates_it(stack, tiny_root, tmp_path):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    env = {"ENSEMBLE_STORAGE": f"s3://{bucket}/run", "DATA_ROOT": str(__import__("pathlib").Path(tiny_root).parent)}
    out = run_cli("jobs/train_ensemble.py", "--config", "configs/smoke.yaml", env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: storage s3://{bucket}/run: bucket '{bucket}' does not exist at "
                                  f"{stack['s3_endpoint']}; create it, fix the name, or set storage.create_bucket: true")
    s3 = boto3.client("s3")
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]  # nothing was written
    storage.check_writable(f"s3://{bucket}/run", create_bucket=True)  # storage.create_bucket: true
    try:
        assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    finally:
        s3.delete_bucket(Bucket=bucket)
