"""Look at the MLflow UI as a user does: headless Chromium screenshots of an ensemble's
experiment page, its parent run and one member's run, and a check of the rendered pages.

    python bench/ui_screenshots.py --store mlruns/mlflow.db --out ui-shots
    python bench/ui_screenshots.py --tracking-uri http://127.0.0.1:5055 --out ui-shots

With `--store` (the embedded default's SQLite file) an MLflow server is started on
127.0.0.1 for the run and stopped after; with `--tracking-uri` a running one is used.
Needs Debian's `chromium` (apt-get install chromium). Writes experiment.png (the
experiment on the job's saved view: ensemble and members ranked by val top-5 error),
parent_run.png and member_run.png, then checks the rendered DOM (`--dump-dom`) of the
experiment page for every member's name and the ensemble's val top-5 error, and of the
parent run's page for the ensemble's result table; the last lines say what was found.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.views.tracking import run_page_url, runs_view_url  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def start_server(store: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{os.path.abspath(store)}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"the MLflow server on 127.0.0.1:{port} did not start within 60 s")


def chromium(*args: str, timeout: int = 120) -> str:
    """Headless Chromium; virtual time lets the single-page app render before the shot."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1920,1000", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


# Words only the MLflow UI's GenAI layout shows in its side bar (MLflow 3.17); the
# model-training layout shows Runs, Models, Traces instead
GENAI_LAYOUT = ("Observability", "Judges", "Evaluation runs")


def page_text(url: str, profile: str) -> str:
    """The text a user sees at `url` in a fresh browser profile (nothing remembered, no
    click), as rendered by headless Chromium: the DOM without tags, scripts and styles."""
    dom = chromium(f"--user-data-dir={profile}", "--dump-dom", url)
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def check_link(url: str, profile: str, ensemble: str, members: list[str], method_row: str) -> list[str]:
    """What is wrong with a link the job printed, as a user opening it would find it: it
    must open the model-training layout; a runs view must list the ensemble (its parent
    run) and the `val_top5_err` column; a run page must show the ensemble's row of the
    result table before any member's (the UI folds the description after its first lines)."""
    text = page_text(url, profile)
    problems = [f"{url}: opens the GenAI layout ({w!r} shown)" for w in GENAI_LAYOUT if w in text][:1]
    if "/runs/" in url.split("#", 1)[-1]:
        row = text.find(method_row)
        first_member = min((i for i in (text.find(m, text.find("Description")) for m in members) if i >= 0),
                           default=-1)
        if row < 0:
            problems.append(f"{url}: the result table's ensemble row ({method_row!r}) is not on the page")
        elif 0 <= first_member < row:
            problems.append(f"{url}: the ensemble row comes after the members (folded away)")
    else:
        problems += [f"{url}: no {what} on the runs page" for what, found in
                     (("val_top5_err column", "val_top5_err" in text), (f"ensemble row {ensemble!r}", ensemble in text))
                     if not found]
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="an MLflow SQLite file (mlruns/mlflow.db): served here for the run")
    where.add_argument("--tracking-uri", help="a running MLflow server")
    p.add_argument("--experiment", help="experiment name (default: the newest with an ensemble parent run)")
    p.add_argument("--out", default="ui-shots")
    p.add_argument("--port", type=int, default=5077)
    args = p.parse_args()
    server = start_server(args.store, args.port) if args.store else None
    uri = args.tracking_uri or f"http://127.0.0.1:{args.port}"
    try:
        client = MlflowClient(uri)
        exps = [client.get_experiment_by_name(args.experiment)] if args.experiment else client.search_experiments()
        parents = [r for e in exps for r in client.search_runs([e.experiment_id], "tags.`ensemble.kind` = 'parent'")]
        if not parents:
            raise SystemExit("no ensemble parent run found")
        parent = parents[0]
        exp_id = parent.info.experiment_id
        children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # the job's saved view: members and ensemble in one list ranked by val top-5 error
        pages = {"experiment": runs_view_url(uri, exp_id), "parent_run": run_page_url(uri, exp_id, parent.info.run_id),
                 "member_run": run_page_url(uri, exp_id, children[0].info.run_id)}
        for name, url in pages.items():
            chromium(f"--screenshot={out / (name + '.png')}", url)
        listed = chromium("--dump-dom", pages["experiment"])
        missing = [c.info.run_name for c in children if c.info.run_name not in listed]
        ranked = parent.data.metrics.get("val_top5_err")
        ranked_shown = ranked is not None and f">{ranked!r}<" in listed  # the ensemble's cell in the table
        top5 = parent.data.metrics.get("job_ensemble_top5_err")
        shown = chromium("--dump-dom", pages["parent_run"])
        print(f"screenshots: {', '.join(str(out / (n + '.png')) for n in pages)}")
        print(f"experiment page lists {len(children) - len(missing)} of {len(children)} members"
              + (f" (missing: {', '.join(missing)})" if missing else ""))
        print(f"experiment page ranks the ensemble by its val top-5 error {ranked} "
              f"({'found' if ranked_shown else 'NOT found'})")
        has_result = top5 is not None and f"{top5:.2%}" in shown
        print(f"parent run page shows the ensemble's top-5 error ({'found' if has_result else 'NOT found'})")
        # the links the job prints, each opened in a fresh browser profile, without a click
        names = [c.info.run_name for c in children]
        row = f"ensemble (mean_softmax, {len(children)} members)"
        problems = [p for name in ("experiment", "parent_run") for p in
                    check_link(pages[name], tempfile.mkdtemp(prefix="chromium-"), parent.info.run_name, names, row)]
        for p in problems:
            print(f"link problem: {p}")
        print(f"the job's links open the model-training layout with the ensemble first: "
              f"{'yes' if not problems else 'NO'}")
        if missing or not has_result or not ranked_shown or problems:
            raise SystemExit(1)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
