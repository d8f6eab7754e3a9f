"""Shared fixtures: the real data under ../shared/data and the local stack.

Tests marked `stack` need the S3 server, MLflow server and Ray head of
infra/local/up.sh (`infra/local/test.sh` starts and stops them). Without the stack they
are skipped, unless STACK_REQUIRED=1 (as in CI), where a missing service is a failure.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DATA_ROOT", ROOT.parent / "shared" / "data")).resolve()
TINY = DATA / "tiny-imagenet-200"

# a test run's evaluation cache (downloads, decoded splits, recomputed predictions) is its
# own, not the user's ~/.cache/ensemble-eval; set before any test imports ensemble.core.predictions
_EVAL_CACHE = tempfile.mkdtemp(prefix="ensemble-eval-")
os.environ["ENSEMBLE_CACHE"] = _EVAL_CACHE
atexit.register(shutil.rmtree, _EVAL_CACHE, True)
# ... and so is its data cache (minivals carved from streamed splits)
_DATA_CACHE = tempfile.mkdtemp(prefix="ensemble-data-")
os.environ["ENSEMBLE_DATA_CACHE"] = _DATA_CACHE
atexit.register(shutil.rmtree, _DATA_CACHE, True)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def tiny_root() -> str:
    if not (TINY / "manifest.json").exists():
        pytest.fail(f"Tiny-ImageNet shards not found at {TINY} (set DATA_ROOT)")
    return str(TINY)


@pytest.fixture(scope="session")
def stack() -> dict:
    """The running local stack's endpoints (from infra/local/env.sh)."""
    ports = {"s3": int(os.environ.get("S3_PORT", 8333)), "mlflow": int(os.environ.get("MLFLOW_PORT", 5055)),
             "ray": int(os.environ.get("RAY_DASHBOARD_PORT", 8265))}
    down = [name for name, port in ports.items() if not port_open(port)]
    if down:
        message = f"local stack not running ({', '.join(down)} down): start it with infra/local/up.sh"
        if os.environ.get("STACK_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return {"bucket": os.environ.get("S3_BUCKET", "ensembles"), "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
            "dashboard": f"http://127.0.0.1:{ports['ray']}", "s3_endpoint": os.environ["AWS_ENDPOINT_URL"]}


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a project command the way a user does, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
