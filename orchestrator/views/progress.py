"""What a user watches while a job trains: one row per member, live.

`MemberBoard` is a Ray Tune callback in the job's driver. Each member's per-epoch report
(the same metrics its MLflow child run gets) updates its row: arch, status, epoch k/K,
train loss, held-out top-1/top-5 error (minival when the config has one), images/s, time
left, restarts; a footer counts members done/running/pending and estimates the job's
time left. On a terminal the table is redrawn in place (rich `Live`, as Ray's dashboard
or timm's logs show progress); elsewhere (`ray job submit`, CI logs) each member epoch is
one plain line. Tune's own trial tables are turned off (`verbose=0`), and a trial that
Tune restarts after its process died is one line naming the member, the cause and the
epoch it resumes from; the traceback Tune logs for it goes to the job's log file
(`quiet_tune`), which that line names.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.base import storage


@dataclass
class Row:
    name: str
    arch: str
    epochs: int
    status: str = "pending"
    epoch: int = 0
    train_loss: float | None = None
    top1: float | None = None
    top5: float | None = None
    images_per_s: float | None = None
    epoch_minutes: float | None = None
    restarts: int = 0

    def minutes_left(self) -> float | None:
        if self.status == "done":
            return 0.0
        if self.epoch_minutes is None:
            return None
        return (self.epochs - self.epoch) * self.epoch_minutes


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _minutes(x: float | None) -> str:
    return "" if x is None else (f"{x:.1f} min" if x < 90 else f"{x / 60:.1f} h")


# Tune logs a failed trial's whole traceback here ("Trial task failed for trial ...")
TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"


@contextlib.contextmanager
def quiet_tune(path: str):
    """While the job runs, Tune prints nothing of its own: what its controller logs (a failed
    trial's traceback among it) goes to the file at `path`, where the board's restart line
    points, and its start banner ("Configuration for experiment", "View detailed results
    here") is off. Ray's new output engine prints that banner whatever `verbose` says; the
    classic one (`RAY_AIR_NEW_OUTPUT=0`, read when `fit` starts) is silent at `verbose=0`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    log = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    was, output = log.propagate, os.environ.get("RAY_AIR_NEW_OUTPUT")
    log.addHandler(handler)
    log.propagate = False
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield path
    finally:
        log.removeHandler(handler)
        log.propagate = was
        handler.close()
        if output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = output


class MemberBoard(Callback):
    def __init__(self, members, heldout: str = "val", console: Console | None = None, live: bool | None = None,
                 concurrency: int = 1, log_path: str | None = None, log_uri: str | None = None):
        self.rows = {m.key: Row(m.name, m.arch, m.recipe.epochs) for m in members}
        self.heldout, self.concurrency = heldout, max(1, concurrency)
        self.console = console or Console()
        # Tune's log is written at `log_path` (a local file) and copied to `log_uri` (the job's
        # storage: under `ray job submit` the driver's folder is a temporary copy) on a restart
        self.log_path, self.log_uri = log_path, log_uri or log_path
        self.live_mode = self.console.is_terminal if live is None else live
        self.live: Live | None = None

    # Tune pickles its run config (callbacks included) into the experiment's state: the
    # console and the live display (locks, a refresh thread) stay out of it
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live")}

    def __setstate__(self, state):
        self.__dict__.update(state, console=Console(), live=None)

    # --- Tune callback hooks (called in the driver) ---------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.status = "running"
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        if row is None or "epoch" not in result:
            return
        row.status, row.epoch = "running", int(result["epoch"])
        row.train_loss = result.get("train_loss")
        row.top1, row.top5 = result.get(f"{self.heldout}_top1_err"), result.get(f"{self.heldout}_top5_err")
        row.images_per_s, row.epoch_minutes = result.get("images_per_s"), result.get("epoch_minutes")
        if not self.live_mode:
            self.console.print(self.plain_line(row), highlight=False, soft_wrap=True)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row is not None:
            row.status = "done" if row.epoch >= row.epochs else "stopped"
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row is not None:
            row.status = "failed"
        self._show()

    def on_trial_recover(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row is None:
            return
        row.restarts += 1
        row.status = "restarting"
        cause = (getattr(trial, "error_msg", None) or "its trial process died").strip().splitlines()[-1][:160]
        where = f" (traceback in {self.log_uri})" if self.log_uri else ""
        self.sync_log()
        self.console.print(f"member {row.name}: restarted ({cause}); resumes after epoch {row.epoch} "
                           f"from its latest checkpoint{where}", highlight=False, soft_wrap=True)
        self._show()

    def sync_log(self) -> None:
        """The local log file, as written so far, copied to `log_uri`."""
        if self.log_path and self.log_uri != self.log_path and os.path.exists(self.log_path):
            try:
                for handler in logging.getLogger(TUNE_CONTROLLER_LOGGER).handlers:
                    handler.flush()
                storage.put_file(self.log_path, self.log_uri)
            except Exception as exc:  # the log is a convenience; never fail the job for it
                self.console.print(f"could not copy {self.log_path} to {self.log_uri} ({type(exc).__name__})")

    def on_experiment_end(self, trials, **info):
        self.stop()

    # --- rendering ------------------------------------------------------------------
    def _row(self, trial) -> Row | None:
        return self.rows.get((getattr(trial, "config", None) or {}).get("member_key"))

    def plain_line(self, row: Row) -> str:
        parts = [f"member {row.name} ({row.arch}): epoch {row.epoch}/{row.epochs}"]
        if row.train_loss is not None:
            parts.append(f"train loss {row.train_loss:.3f}")
        if row.top1 is not None:
            parts.append(f"{self.heldout} top-1 err {_pct(row.top1)} top-5 err {_pct(row.top5)}")
        if row.images_per_s is not None:
            parts.append(f"{row.images_per_s:.0f} images/s")
        left = row.minutes_left()
        if left is not None and row.epoch < row.epochs:
            parts.append(f"{_minutes(left)} left")
        return ", ".join(parts)

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for r in self.rows.values():
            key = r.status if r.status in out else ("done" if r.status == "stopped" else "running")
            out[key] += 1
        return out

    def job_minutes_left(self) -> float | None:
        """Members' remaining minutes spread over the concurrent slots; a pending member is
        costed at the mean full length of the members seen so far."""
        seen = [r.epoch_minutes * r.epochs for r in self.rows.values() if r.epoch_minutes]
        if not seen:
            return None
        typical = sum(seen) / len(seen)
        left = [r.minutes_left() if r.epoch_minutes else typical for r in self.rows.values()
                if r.status not in ("done", "stopped", "failed")]
        return max(max(left, default=0.0), sum(left) / self.concurrency)

    def table(self) -> Table:
        t = Table(title="members", caption=self.footer(), caption_justify="left")
        for col in ("member", "arch", "status", "epoch", "train loss", f"{self.heldout} top-1 err", f"{self.heldout} top-5 err",
                    "images/s", "left", "restarts"):
            t.add_column(col, justify="left" if col in ("member", "arch", "status") else "right")
        for r in self.rows.values():
            t.add_row(r.name, r.arch, r.status, f"{r.epoch}/{r.epochs}",
                      "" if r.train_loss is None else f"{r.train_loss:.3f}", _pct(r.top1), _pct(r.top5),
                      "" if r.images_per_s is None else f"{r.images_per_s:.0f}", _minutes(r.minutes_left()),
                      str(r.restarts or ""))
        return t

    def footer(self) -> str:
        c = self.counts()
        left = self.job_minutes_left()
        text = f"{c['done']} done, {c['running']} running, {c['pending']} pending"
        text += f", {c['failed']} failed" if c["failed"] else ""
        return text + (f"; job: about {_minutes(left)} left" if left is not None else "")

    def _show(self) -> None:
        if not self.live_mode:
            return
        if self.live is None:
            self.live = Live(self.table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        else:
            self.live.update(self.table())

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.stop()
            self.live = None
