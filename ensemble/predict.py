"""Batch prediction: a trained ensemble over a folder of images or a shard set.

    python -m ensemble.predict --members runs.yaml --images photos/ --out predictions.csv
    python -m ensemble.predict --members s3://b/ens/runs.yaml --images s3://b/shards \\
        --out predictions.csv --address auto          # on a Ray cluster, with Ray Data

One CSV row per image: its name (a file's path under --images, a shard sample's key), the
five most probable classes and their probabilities (`;`-separated, descending, ties in
class order) and an error for an image that does not decode. The ensemble is the runs
file's finished members combined as `ensemble.evaluate` combines them by default (mean
softmax; `--method weighted` uses the runs file's weights), each at its own eval geometry
(`ensemble.core.serve.Ensemble`, what the served model runs). With `--address`, Ray Data
spreads the images over actors (`map_batches`), each loading the members once.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Iterator

import fsspec

from ensemble.core.options import METHODS
from ensemble.core.serve import Ensemble, _decoded, ensemble_spec
from ensemble.core.stored import local_copy
from orchestrator.base.errors import UserError, exit_on_user_error
from orchestrator.data.dataset import open_split
from orchestrator.data.manifest import FOLDER_PREFIX
from orchestrator.records.runs_file import RunsFile, load_runs

SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble.predict", description=__doc__.splitlines()[0])
    p.add_argument("--members", required=True, help="runs.yaml of the ensemble (path or URL)")
    p.add_argument("--images", required=True, help="a folder of JPEG/PNG files, or a shard folder with manifest.json")
    p.add_argument("--split", default="val", help="the shard set's split (default: %(default)s)")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--method", default="mean_softmax", choices=sorted(METHODS))
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (default: %(default)s)")
    p.add_argument("--address", help="a Ray cluster (e.g. auto): predict with Ray Data")
    p.add_argument("--actors", type=int, default=2, help="Ray Data actors, each with the members loaded (default: 2)")
    return p.parse_args(argv)


def image_items(root: str, split: str) -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes) of every image under `root`: a shard set's samples (it has a
    manifest.json), else the files with an image suffix, in sorted order."""
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(f"{path.rstrip('/')}/manifest.json"):
        for s in open_split(root, split).iter_samples():
            yield s.key, s.data
        return
    if not fs.isdir(path):
        raise UserError(f"--images {root}: not a folder (valid: a folder of .jpg/.jpeg/.png files, or a shard "
                        f"folder with manifest.json)")
    files = sorted(f for f in fs.find(path) if f.lower().endswith(SUFFIXES))
    if not files:
        raise UserError(f"--images {root}: no .jpg, .jpeg or .png file in it")
    for f in files:
        yield os.path.relpath(f, path) if fs.protocol in ("file", ("file", "local")) else f, fs.cat_file(f)


def member_spec(runs: RunsFile, method: str) -> tuple[dict, dict[str, str]]:
    """The ensemble's spec and its members' checkpoint URIs (copied locally where it runs)."""
    finished = runs.ensemble_members()
    if not finished:
        raise UserError("the runs file has no finished member")
    weights = [m.weight if method == "weighted" else 1.0 for m in finished]
    return ensemble_spec(runs, finished, weights, METHODS[method], copy=False)


class Predictor:
    """Members loaded once (per Ray Data actor); a batch of {name, image bytes} -> rows."""

    def __init__(self, spec: dict, checkpoints: dict[str, str]):
        self.ensemble = Ensemble(spec, {k: local_copy(v, k) for k, v in checkpoints.items()})

    def __call__(self, batch: dict) -> dict:
        names = [str(n) for n in batch["name"]]
        answer = self.ensemble.answer([_decoded(n, bytes(data)) for n, data in zip(names, batch["image"])])
        answer["error"] = [e.split(";")[0] for e in answer["error"]]  # "<name>: not a JPEG or PNG image"
        return {"name": names, "top5_classes": [";".join(c) for c in answer["top5_classes"]],
                "top5_probs": [";".join(f"{p:.6g}" for p in ps) for ps in answer["top5_probs"]],
                "error": answer["error"]}


def predict_here(items, spec, checkpoints, batch: int) -> Iterator[dict]:
    predictor, chunk = Predictor(spec, checkpoints), []
    for name, data in items:
        chunk.append((name, data))
        if len(chunk) == batch:
            yield from _rows(predictor({"name": [n for n, _ in chunk], "image": [d for _, d in chunk]}))
            chunk = []
    if chunk:
        yield from _rows(predictor({"name": [n for n, _ in chunk], "image": [d for _, d in chunk]}))


def predict_on_ray(items, spec, checkpoints, batch: int, address: str, actors: int) -> Iterator[dict]:
    import ray  # on use: only this path needs Ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    ds = ray.data.from_items([{"name": n, "image": d} for n, d in items])
    out = ds.map_batches(Predictor, fn_constructor_args=(spec, checkpoints), batch_size=batch, concurrency=actors,
                         batch_format="numpy")
    order = {}
    for row in out.iter_rows():
        order[row["name"]] = {k: row[k] for k in ("name", "top5_classes", "top5_probs", "error")}
    return iter(order[n] for n, _ in items)


def _rows(batch: dict) -> Iterator[dict]:
    for i in range(len(batch["name"])):
        yield {k: batch[k][i] for k in ("name", "top5_classes", "top5_probs", "error")}


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.members)
    spec, checkpoints = member_spec(runs, args.method)
    items = list(image_items(args.images, args.split))
    rows = (predict_on_ray(items, spec, checkpoints, args.batch, args.address, args.actors) if args.address
            else predict_here(items, spec, checkpoints, args.batch))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    written = 0
    with open(args.out + ".partial", "w", newline="") as f:  # the CSV appears whole or not at all
        w = csv.DictWriter(f, fieldnames=["name", "top5_classes", "top5_probs", "error"])
        w.writeheader()
        for row in rows:
            w.writerow(row)
            written += 1
    os.replace(args.out + ".partial", args.out)
    bad = sum(1 for r in csv.DictReader(open(args.out)) if r["error"])
    print(f"wrote {args.out}: {written} images, {len(spec['members'])} members"
          + (f", {bad} not decodable (their error column says why)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
