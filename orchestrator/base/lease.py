"""One job per ensemble and storage path at a time: a lease object in storage.

A job driver writes `<root>/<ensemble>/job.lease` before it trains and renews it every
RENEW seconds from a thread; a second submission of the same config (same ensemble name,
same storage) that finds a lease renewed within TTL seconds is refused with one line. A
driver that dies without releasing its lease holds it for TTL at most: none at all when it
ran on this host (its pid is checked), up to TTL when its node was lost. Object stores have
no compare-and-set, so two submissions in the same second can both write; each reads the
lease back and the one that finds another's gives way.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from orchestrator.base import storage
from orchestrator.base.errors import UserError

RENEW, TTL = 15.0, 60.0


def lease_uri(root: str, ensemble: str) -> str:
    return storage.join(root, ensemble, "job.lease")


class Lease:
    """The job's hold on its ensemble's storage, renewed until `release()`."""

    def __init__(self, root: str, ensemble: str, job: str = ""):
        self.uri = lease_uri(root, ensemble)
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "job": job,
                   "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lease":
        held = storage.read_json(self.uri)
        if held and held.get("id") != self.me["id"] and live(held):
            raise busy(self.uri, held)
        self._write()
        back = storage.read_json(self.uri)
        if back and back.get("id") != self.me["id"]:  # another driver wrote in the same instant
            raise busy(self.uri, back)
        self._thread = threading.Thread(target=self._renew, name="job-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        storage.write_json(self.uri, {**self.me, "renewed": time.time()})

    def _renew(self) -> None:
        while not self._stop.wait(RENEW):
            try:
                self._write()
            except Exception as exc:  # storage down: training goes on; the lease may lapse meanwhile
                print(f"storage: could not renew {self.uri} ({type(exc).__name__})", flush=True)

    def release(self) -> None:
        self._stop.set()
        held = storage.read_json(self.uri)
        if held and held.get("id") == self.me["id"]:
            storage.remove(self.uri)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live(held: dict) -> bool:
    """Renewed within TTL, by a driver that still runs: on this host its pid is checked, so
    a driver killed here (SIGKILL) frees its lease at once."""
    if time.time() - held.get("renewed", 0) >= TTL:
        return False
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    return True


def busy(uri: str, held: dict) -> UserError:
    age = time.time() - held.get("renewed", 0)
    return UserError(f"this ensemble is already being trained under this storage path: job {held.get('job') or '?'} "
                     f"(host {held.get('host')}, pid {held.get('pid')}) renewed its lease {uri} {age:.0f} s ago; "
                     f"wait for it to end, or stop it (a lease not renewed for {TTL:.0f} s is free)")
