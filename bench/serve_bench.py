"""What calling an ensemble costs: REST latency, its overhead, and batch prediction.

For an ensemble's runs file (default: the first command's, `runs.yaml`) and its best
member alone, in one run on this machine: each is logged as an MLflow model
(`ensemble.core.serve`) and served by `mlflow models serve --env-manager local` on 127.0.0.1;
prints p50 and p95 latency of requests of 1 and of 16 val images (base64 JPEGs in
`dataframe_split`) through the REST server and in process (the same model, `predict`),
the REST overhead (their difference at p50), and batch prediction images/s over the
runs file's val images (`ensemble.predict`, in process).

    .venv/bin/python bench/serve_bench.py --members runs.yaml [--best NAME] [--requests 30]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ensemble import predict as batch  # noqa: E402
from ensemble.core.serve import log_ensemble_model  # noqa: E402
from orchestrator.data.dataset import open_split  # noqa: E402
from orchestrator.records.runs_file import load_runs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, tracking: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return server, port
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the scoring server did not start")
            time.sleep(0.5)


def timed(call, n: int) -> list[float]:
    call()  # warm-up
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(1000 * (time.perf_counter() - start))
    return out


def percentiles(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), float(np.percentile(ms, 95))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", default="runs.yaml")
    p.add_argument("--best", help="the best member's name (default: the lowest top-1 error on the minival, as "
                                  "the evaluation chooses; on val without one)")
    p.add_argument("--requests", type=int, default=30, help="timed requests per size (default: %(default)s)")
    args = p.parse_args()
    runs = load_runs(args.members)
    finished = runs.ensemble_members()
    chosen_on = "minival_top1_err" if runs.minival is not None else "top1_err"
    best = next(m for m in finished if m.name == args.best) if args.best else min(
        finished, key=lambda m: m.metrics.get(chosen_on, 1.0))
    ds = runs.dataset
    images = [s.data for s in open_split(ds.uri, ds.split, ds.classes, ds.per_class).iter_samples()]
    b64 = [base64.b64encode(d).decode("ascii") for d in images]
    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        import mlflow

        client = mlflow.MlflowClient(tracking)
        run = client.create_run(client.create_experiment("serve-bench")).info.run_id
        lines = []
        for label, members in ((f"ensemble of {len(finished)}", finished), (f"best member {best.name}", [best])):
            uri = log_ensemble_model(runs, members, [1.0] * len(members), run, tracking)
            model = mlflow.pyfunc.load_model(uri)
            server, port = serve(uri, tracking)
            try:
                for n in (1, 16):
                    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[x] for x in b64[:n]]}})

                    def rest():
                        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                                     {"Content-Type": "application/json"})
                        urllib.request.urlopen(req, timeout=120).read()

                    frame = __import__("pandas").DataFrame({"image": images[:n]})
                    r50, r95 = percentiles(timed(rest, args.requests))
                    i50, i95 = percentiles(timed(lambda: model.predict(frame), args.requests))
                    lines.append(f"{label}: {n:>2} image(s) a request: REST p50 {r50:.1f} ms, p95 {r95:.1f} ms; "
                                 f"in process p50 {i50:.1f} ms, p95 {i95:.1f} ms; REST overhead {r50 - i50:.1f} ms")
            finally:
                os.killpg(server.pid, 15)
                server.wait(timeout=30)
            spec, checkpoints = batch.ensemble_spec(runs, members, [1.0] * len(members), copy=False)
            start = time.perf_counter()
            rows = sum(1 for _ in batch.predict_here(list(zip(map(str, range(len(images))), images)), spec,
                                                     checkpoints, 64))
            lines.append(f"{label}: batch prediction {rows / (time.perf_counter() - start):.0f} images/s "
                         f"({rows} val images, batch 64, in process)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
