"""A tracking server or object store that stays down: checked before any work, and a job
that outlives its retry budget ends in one line, not a traceback.

- At the start, an MLflow server that does not answer (`check_tracking`) is one
  `UserError` line, exit 2; so is an object store (`storage.check_bucket`).
- Later, every request is retried: MLflow's client by its own budget
  (MLFLOW_HTTP_REQUEST_MAX_RETRIES retries, backoff factor MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR:
  7 and 2 by default, about 4 minutes, `tracking_budget_s`), storage by STORAGE_RETRY_SECONDS
  (300). Past the budget `exit_on_outage` prints one line naming the server, how long it
  was tried and what was kept, writes the traceback to a log file and exits 1.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, TypeVar

from orchestrator.base.errors import UserError
from orchestrator.base.storage import transient  # the one rule for what is worth retrying

T = TypeVar("T")
# what the S3 clients (botocore, aiobotocore/aiohttp) raise when the store does not answer
S3_DOWN = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
           "ClientConnectorError", "ServerDisconnectedError")


def tracking_budget_s() -> float:
    """Seconds MLflow's client waits over its retries (urllib3 backoff: factor x 2^(i-1),
    each wait capped at 120 s)."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2))
    return sum(min(factor * 2 ** (i - 1), 120.0) for i in range(1, retries + 1))


def check_tracking(uri: str | None) -> None:
    """An http(s) tracking URI must answer now (one quick request, a few seconds of grace),
    else the job or evaluation stops before any work."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    import requests

    error = None
    for _ in range(3):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5)
            return
        except requests.RequestException as exc:
            error = exc
            time.sleep(1)
    raise UserError(f"the MLflow tracking server at {uri} does not answer ({_short(error)}); start it, or point "
                    f"mlflow.tracking_uri / MLFLOW_TRACKING_URI at a running one")


def _short(exc: BaseException | None) -> str:
    text = str(exc or "")
    for pattern in (r"Connection refused", r"Name or service not known", r"timed out", r"Max retries exceeded"):
        if re.search(pattern, text):
            return pattern.lower()
    return type(exc).__name__


def which_server(exc: BaseException) -> str | None:
    """'the MLflow tracking server at URL' / 'the object store at URL' when `exc` (or its
    cause) is a connection that outlived its retries, else None."""
    seen = 0
    while exc is not None and seen < 10:
        name, text = type(exc).__name__, str(exc)
        if name == "MlflowException" and ("Max retries exceeded" in text or "API request to" in text and
                                          ("Connection" in text or "ResponseError" in text)):
            url = re.search(r"API request to (https?://[^/\s]+)", text)
            return f"the MLflow tracking server at {url.group(1) if url else os.environ.get('MLFLOW_TRACKING_URI', '?')}"
        if name in ("ConnectionError", "MaxRetryError") and "Max retries exceeded" in text:
            host = re.search(r"host='([^']+)', port=(\d+)", text)
            return f"the MLflow tracking server at {host.group(1)}:{host.group(2)}" if host else "the tracking server"
        if transient(exc) and (name in S3_DOWN or isinstance(exc, (ConnectionRefusedError, ConnectionResetError))) \
                or isinstance(exc, OSError) and "AWS Error NETWORK_CONNECTION" in text:  # pyarrow's S3 (Ray's storage)
            return f"the object store at {os.environ.get('AWS_ENDPOINT_URL', 'AWS S3')}"
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)  # a Ray task error's cause
        seen += 1
    return None


def exit_on_outage(kept: Callable[[], str]) -> Callable:
    """Decorator for a CLI main: an outage past its retry budget becomes one line on stderr
    (the server, how long it was tried, `kept()`: what survives), the traceback goes to
    logs/<program>-<time>.log, exit 1."""

    def wrap(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except Exception as exc:
                server = which_server(exc)
                if server is None:
                    raise
                log = Path("logs") / f"{Path(sys.argv[0]).stem or 'job'}-{time.strftime('%Y%m%d-%H%M%S')}.log"
                log.parent.mkdir(exist_ok=True)
                log.write_text("".join(traceback.format_exception(exc)))
                tried = (f"its retry budget, about {tracking_budget_s():.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
                         f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR)" if "MLflow" in server else
                         f"its retry budget, {float(os.environ.get('STORAGE_RETRY_SECONDS', 300)):.0f} s "
                         f"(STORAGE_RETRY_SECONDS)")
                print(f"error: {server} stayed down past {tried}; stopped. {kept()} Traceback: {log.resolve()}",
                      file=sys.stderr)
                raise SystemExit(1) from None

        return wrapped

    return wrap
