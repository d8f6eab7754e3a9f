"""Paths under the job's storage root (local folder or s3://), through fsspec.

    <root>/<ensemble>/train/<member key>/epoch_*/       a single-worker member's latest checkpoint
    <root>/<ensemble>/train/<member key>/latest.json    ... and its pointer (orchestrator/runtime/in_trial.py)
    <root>/<ensemble>/train/<member key>/checkpoint_*/  a data-parallel member's Ray Train run
    <root>/<ensemble>/members/<member key>.json           a finished member's record
    <root>/<ensemble>/tune/                               Tune's own experiment state

Object stores have outages. Every read and write here is retried with exponential
backoff for up to STORAGE_RETRY_SECONDS (default 300 s), and Ray Train/Tune get a
pyarrow S3 filesystem whose AWS retry strategy also rides out minutes, so a blip of
S3 delays a member instead of failing it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from typing import Callable, TypeVar
from urllib.parse import urlparse

import fsspec

from orchestrator.base.errors import UserError


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme not in ("", "file")


def absolute(uri: str) -> str:
    """Ray needs an absolute local path; remote URIs pass through."""
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def check_bucket(root: str, create: bool = False) -> None:
    """An s3:// root's bucket must exist before the job (a misspelt bucket is refused, not
    created by the first write as some S3 servers do; on AWS that write would fail), unless
    `create` (`storage.create_bucket`) asks for it."""
    if urlparse(root).scheme != "s3":
        return
    bucket = urlparse(root).netloc
    fs = fsspec.filesystem("s3")

    def exists() -> bool:
        fs.invalidate_cache()
        return bool(fs.exists(bucket))

    try:
        found = retry(exists, f"looking up bucket {bucket}", seconds=20)
    except Exception as exc:
        raise UserError(f"storage {root}: cannot reach the object store at "
                        f"{os.environ.get('AWS_ENDPOINT_URL', 'AWS S3')} ({type(exc).__name__}: {exc})") from None
    if found:
        return
    if not create:
        raise UserError(f"storage {root}: bucket {bucket!r} does not exist at "
                        f"{os.environ.get('AWS_ENDPOINT_URL', 'AWS S3')}; create it, fix the name, or set "
                        f"storage.create_bucket: true")
    retry(lambda: fs.mkdir(bucket), f"creating bucket {bucket}")
    print(f"storage: created bucket {bucket} (storage.create_bucket)", flush=True)


def check_writable(root: str, create_bucket: bool = False) -> None:
    """Write and delete a probe object, so a read-only or unreachable storage path fails
    before any member trains rather than at the first checkpoint."""
    check_bucket(root, create_bucket)
    probe = join(root, f".write-probe-{uuid.uuid4().hex[:8]}")

    def write_probe():
        fs, path = fsspec.core.url_to_fs(probe)
        if not is_remote(root):
            os.makedirs(root, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    try:
        retry(write_probe, f"writing to {root}", seconds=20)  # a blip, not a misconfiguration
    except Exception as exc:  # any failure here means the job cannot store its results
        raise UserError(f"storage path {root} is not writable: {type(exc).__name__}: {exc}") from None


T = TypeVar("T")
log = logging.getLogger(__name__)
PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def transient(exc: BaseException) -> bool:
    """A connection-level failure worth retrying (server down, reset, timeout), not a
    missing object or a refused permission."""
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):  # a full or read-only disk will not heal by waiting
        return exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EINVAL)
    return type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                  "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError")


def retry(fn: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """fn() until it succeeds, a permanent error, or `seconds` of exponential backoff
    (1, 2, 4 ... 30 s between tries)."""
    budget = float(os.environ.get("STORAGE_RETRY_SECONDS", 300)) if seconds is None else seconds
    deadline, delay = time.monotonic() + budget, 1.0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.0f s", what, type(exc).__name__, delay)
            print(f"storage: {what} failed ({type(exc).__name__}); retrying in {delay:.0f} s", flush=True)
            time.sleep(delay)
            fsspec.AbstractFileSystem.clear_instance_cache()  # a fresh connection pool
            delay = min(delay * 2, 30.0)


def write_json(uri: str, payload: dict) -> None:
    def write():
        fs, path = fsspec.core.url_to_fs(uri)
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(payload, f, indent=1)
    retry(write, f"writing {uri}")


def read_json(uri: str) -> dict | None:
    def read():
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            return None
        with fs.open(path, "r") as f:
            return json.load(f)
    return retry(read, f"reading {uri}")


def read_npy(uri: str):
    """A .npy array from a local path or any fsspec URL (predictions, labels), retried."""
    import io

    import numpy as np

    def read():
        with fsspec.open(uri, "rb") as f:
            return np.load(io.BytesIO(f.read()))
    return retry(read, f"reading {uri}")


def _s3_filesystem_class():
    from pyarrow import fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3 filesystem with a retry strategy that survives pickling (Ray
        ships the filesystem to its Train controller and workers; pyarrow's own pickle
        drops the strategy and falls back to 3 attempts)."""

        def __init__(self, attempts: int, **options):
            super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
            self._attempts, self._options = attempts, options

        def __reduce__(self):
            return _rebuild_s3, (self._attempts, self._options)

    return RetryingS3FileSystem


def _rebuild_s3(attempts: int, options: dict):
    return _S3()(attempts, **options)


_S3_CLASS = None


def _S3():
    global _S3_CLASS
    if _S3_CLASS is None:
        _S3_CLASS = _s3_filesystem_class()
    return _S3_CLASS


def s3_attempts() -> int:
    """pyarrow's attempts per request, within the storage retry budget: the AWS standard
    strategy's backoff is capped at 20 s, and a refused connection costs about that much an
    attempt (measured: 15 attempts, 279 s), so the default 300 s budget gives 15 and a
    test's 3 s gives one. S3_MAX_ATTEMPTS sets it outright."""
    if os.environ.get("S3_MAX_ATTEMPTS"):
        return int(os.environ["S3_MAX_ATTEMPTS"])
    return max(1, round(float(os.environ.get("STORAGE_RETRY_SECONDS", 300)) / 20))


def ray_storage(uri: str):
    """(storage_filesystem, storage_path) for a Ray Train/Tune RunConfig: for s3:// a
    pyarrow S3 filesystem retrying for the storage budget (`s3_attempts`), otherwise
    Ray's own resolution."""
    if urlparse(uri).scheme != "s3":
        return None, uri
    attempts = s3_attempts()
    # endpoint and region come from AWS_ENDPOINT_URL / AWS_DEFAULT_REGION, as for boto3
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc or endpoint, scheme=parsed.scheme or "https")
    if os.environ.get("AWS_DEFAULT_REGION"):
        options["region"] = os.environ["AWS_DEFAULT_REGION"]
    return _S3()(attempts, **options), uri.removeprefix("s3://")


def checkpoint_uri(storage_root: str, fs_path: str) -> str:
    """A Ray checkpoint's path (pyarrow form: no scheme for S3) as a URI fsspec can open."""
    scheme = urlparse(storage_root).scheme
    return f"{scheme}://{fs_path}" if scheme and scheme != "file" else fs_path


def put_dir(folder: str, uri: str) -> None:
    """Upload a flat local folder's files to `uri`/ (a checkpoint), retried."""
    def put():
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(folder)):
            fs.put_file(os.path.join(folder, name), f"{path.rstrip('/')}/{name}")
    retry(put, f"uploading {uri}")


def put_file(local: str, uri: str) -> None:
    """Copy one local file to `uri` (a log file into the job's storage), retried."""
    if absolute(uri) == os.path.abspath(local):
        return

    def put():
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(local, path)
    retry(put, f"uploading {uri}")


def get_dir(uri: str, folder: str) -> str:
    """Download the files under `uri`/ into the local `folder`; returns `folder`."""
    def get():
        fs, path = fsspec.core.url_to_fs(uri)
        os.makedirs(folder, exist_ok=True)
        for entry in fs.ls(path, detail=False):
            fs.get_file(entry, os.path.join(folder, os.path.basename(entry.rstrip("/"))))
        return folder
    return retry(get, f"downloading {uri}")


def local_dir(uri: str, folder: str) -> str:
    """A local folder with the files under `uri`/: that folder itself on local storage (no
    copy of a checkpoint just written), else a download into `folder`."""
    if not is_remote(uri):
        return fsspec.core.url_to_fs(uri)[1]
    return get_dir(uri, folder)


def remove(uri: str) -> None:
    """Delete `uri` and everything under it; a missing one is fine."""
    def rm():
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    retry(rm, f"removing {uri}")
