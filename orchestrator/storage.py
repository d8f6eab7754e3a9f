"""Paths under the job's storage root (local folder or s3://), through fsspec.

    <root>/<ensemble>/train/<member key>/checkpoint_*/   Ray Train runs (model.pt, predictions)
    <root>/<ensemble>/members/<member key>.json           a finished member's record
    <root>/<ensemble>/tune/                               Tune's own experiment state
"""
from __future__ import annotations

import json
import os
import uuid
from urllib.parse import urlparse

import fsspec

from orchestrator.errors import UserError


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme not in ("", "file")


def absolute(uri: str) -> str:
    """Ray needs an absolute local path; remote URIs pass through."""
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def check_writable(root: str) -> None:
    """Write and delete a probe object, so a read-only or unreachable storage path fails
    before any member trains rather than at the first checkpoint."""
    probe = join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if not is_remote(root):
            os.makedirs(root, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except Exception as exc:  # any failure here means the job cannot store its results
        raise UserError(f"storage path {root} is not writable: {type(exc).__name__}: {exc}") from None


def write_json(uri: str, payload: dict) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=1)


def read_json(uri: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def checkpoint_uri(storage_root: str, fs_path: str) -> str:
    """A Ray checkpoint's path (pyarrow form: no scheme for S3) as a URI fsspec can open."""
    scheme = urlparse(storage_root).scheme
    return f"{scheme}://{fs_path}" if scheme and scheme != "file" else fs_path
