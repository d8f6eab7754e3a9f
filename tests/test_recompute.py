"""The recompute path: checkpoint + the member's own eval transform, with test-time views."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ensemble import evaluate
from ensemble.core import tta as tta_views
from ensemble.core.predictions import recompute
from ensemble.core.tta import TTA_VIEWS
from orchestrator.train.augment import EvalGeometry
from models import save_checkpoint
from orchestrator.config import parse_config, resolve_members
from orchestrator.records.runs_file import MemberRecord
from orchestrator.train.member import (assemble_predictions, eval_transform_of, open_member_data, predict,
                                       train_member)


@pytest.mark.parametrize("tta", sorted(TTA_VIEWS))
def test_views_have_the_member_input_size(tta):
    side, crop = tta_views.canvas(tta, 32, 32)
    views = tta_views.views(torch.rand(2, 3, crop, crop), tta, 32)
    assert len(views) == TTA_VIEWS[tta]
    assert all(v.shape == (2, 3, 32, 32) for v in views)


def _marked_image() -> torch.Tensor:
    """A 120 x 160 grey image with a red square at the top-left and a blue one at the
    bottom-right of its central 120 x 120 square, both outside any 0.875 centre crop."""
    img = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    img[:, :5, 20:25] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    img[:, 115:, 135:140] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return img


def test_ten_crops_are_cut_from_the_resized_image():
    # a low-res member: eval resize == crop == 32, so its own centre crop sees neither mark
    resize, crop = tta_views.canvas("10crop", 32, 32)
    assert (resize, crop) == (37, 37)  # 32 / 0.875
    canvas = EvalGeometry(resize, crop)(_marked_image()).unsqueeze(0).float()
    views = tta_views.views(canvas, "10crop", 32)
    red = [bool(((v[0, 0] > 200) & (v[0, 2] < 60)).any()) for v in views]
    blue = [bool(((v[0, 2] > 200) & (v[0, 0] < 60)).any()) for v in views]
    # order: top-left, top-right, bottom-left, bottom-right, centre, then their mirrors
    assert red == [True, False, False, False, False, True, False, False, False, False]
    assert blue == [False, False, False, True, False, False, False, False, True, False]
    assert torch.equal(views[0], canvas[..., :32, :32]) and torch.equal(views[5], canvas[..., :32, :32].flip(-1))
    assert torch.equal(views[4], canvas[..., 2:34, 2:34])
    # a standard member (resize 37, crop 32): its centre crop, from which the corners were
    # once cut, holds neither mark; the ten crops still reach the image's corners
    assert tta_views.canvas("10crop", 37, 32) == (37, 37)
    centre = EvalGeometry(37, 32)(_marked_image()).float()
    assert not ((centre[0] > 200) & (centre[2] < 60)).any() and not ((centre[2] > 200) & (centre[0] < 60)).any()


def test_multiscale_crops_each_scale_of_the_resized_image():
    resize, crop = tta_views.canvas("multiscale", 32, 32)
    assert resize == crop == round(37 * 1.25)
    canvas = EvalGeometry(resize, crop)(_marked_image()).unsqueeze(0).float()
    views = tta_views.views(canvas, "multiscale", 32)
    assert len(views) == 30
    # each scale's top-left corner crop holds the red mark; each scale's crops are distinct
    for s in range(3):
        v = views[10 * s]
        assert ((v[0, 0] > 180) & (v[0, 2] < 90)).any()
    assert not torch.equal(views[4], views[14]) and not torch.equal(views[14], views[24])


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    cfg = parse_config({"name": "r", "data": {"root": tiny_root, "classes": 4, "train_per_class": 6,
                                              "val_per_class": 3},
                        "recipes": {"r": {"epochs": 1, "batch_size": 8}},
                        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32,
                                     "resources": {"loader_workers": 0}}]})
    member = resolve_members(cfg)[0]
    data = open_member_data(cfg.data)
    model, _ = train_member(member, data, device=torch.device("cpu"))
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(folder / "model.pt"), arch="resnet18", num_classes=4, low_res=True, model=model)
    cached = assemble_predictions([predict(model, data.val, member, torch.device("cpu"))], len(data.val))
    ev, _ = eval_transform_of(member)
    record = MemberRecord(name="m", key="m-k", arch="resnet18", checkpoint=str(folder / "model.pt"),
                          eval=ev.to_dict(), low_res=True)
    return record, cached, tiny_root


def test_recomputed_predictions_agree_with_the_cached_ones(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, cached, root = trained
    fresh = recompute(record, root, "val", 4, 3, "none")
    assert np.abs(np.asarray(fresh.array, dtype=np.float32) - cached.astype(np.float32)).max() < 1e-2
    again = recompute(record, root, "val", 4, 3, "none")  # served from the local cache this time
    assert "cached" in again.source and np.array_equal(np.asarray(again.array[np.arange(12)]), fresh.array)


@pytest.mark.parametrize("tta", ["flip", "10crop", "multiscale"])
def test_tta_predictions_are_probabilities_and_state_their_cost(trained, monkeypatch, tmp_path, tta):
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, cached, root = trained
    p = recompute(record, root, "val", 4, 3, tta)
    arr = np.asarray(p.array, dtype=np.float32)
    assert arr.shape == cached.shape and np.allclose(arr.sum(1), 1, atol=1e-2)
    assert p.views == TTA_VIEWS[tta] and not np.allclose(arr, cached.astype(np.float32), atol=1e-4)


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    record = MemberRecord(name="lost", key="k", arch="resnet18", checkpoint=str(tmp_path / "nope.pt"),
                          eval={"input_size": 32, "resize": 32, "crop": 32, "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(evaluate.UserError, match="member lost checkpoint: file not found"):
        recompute(record, "/unused", "val", None, None)


def _decodes(monkeypatch):
    """Count the split's decodings."""
    from ensemble.core import decoded

    calls = []
    real = decoded.decode_split
    monkeypatch.setattr(decoded, "decode_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_members_sharing_an_eval_geometry_decode_the_split_once(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, cached, root = trained
    calls = _decodes(monkeypatch)
    twin = record.model_copy(update={"name": "twin", "key": "twin-k"})
    first = recompute(record, root, "val", 4, 3, "none")
    second = recompute(twin, root, "val", 4, 3, "flip")
    assert len(calls) == 1 and len(list((tmp_path / "decoded").glob("*.npy"))) == 1
    assert np.abs(np.asarray(first.array, dtype=np.float32) - cached.astype(np.float32)).max() < 1e-2
    assert second.array.shape == cached.shape
    # another geometry is another decoding
    bigger = record.eval.model_copy(update={"input_size": 40, "resize": 40, "crop": 40})
    other = record.model_copy(update={"name": "big", "key": "big-k", "eval": bigger})
    assert recompute(other, root, "val", 4, 3, "none").source == "recomputed (none)"  # not the 32-px rows
    assert len(calls) == 2 and len(list((tmp_path / "decoded").glob("*.npy"))) == 2


def test_decoded_and_streamed_inputs_give_the_same_predictions(trained, monkeypatch, tmp_path):
    record, _, root = trained
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "a"))
    decoded = recompute(record, root, "val", 4, 3, "none")
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "b"))
    monkeypatch.setenv("ENSEMBLE_DECODED_MAX_GB", "0")  # too large to cache: streamed from the shards
    streamed = recompute(record, root, "val", 4, 3, "none")
    assert (tmp_path / "a" / "decoded").is_dir() and not (tmp_path / "b" / "decoded").exists()
    assert np.array_equal(np.asarray(decoded.array), np.asarray(streamed.array))


def test_an_interrupted_decoding_leaves_nothing_to_reuse(trained, monkeypatch, tmp_path):
    from ensemble.core import decoded

    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, cached, root = trained
    real = decoded.stream_batches

    def dies_midway(*args):
        yield next(iter(real(*args)))  # one batch written, then the run is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(decoded, "stream_batches", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        recompute(record, root, "val", 4, 3, "none")
    assert list((tmp_path / "decoded").iterdir()) == []
    monkeypatch.setattr(decoded, "stream_batches", real)
    fresh = recompute(record, root, "val", 4, 3, "none")
    assert np.abs(np.asarray(fresh.array, dtype=np.float32) - cached.astype(np.float32)).max() < 1e-2


def test_a_rebuilt_dataset_is_decoded_afresh(tmp_path):
    from ensemble.core.decoded import cache_path
    from orchestrator.data.manifest import Manifest, Shard, load_manifest

    def key(manifest, resize=64):
        return cache_path(tmp_path / "cache", manifest, "val", None, None, resize, 64)

    classes = [{"index": 0, "wnid": "n01", "name": "n01"}]
    shards = Manifest(str(tmp_path), "a", classes, {"val": [Shard("val-0000.tar.gz", 10, "aa", 100)]})
    rebuilt = Manifest(str(tmp_path), "a", classes, {"val": [Shard("val-0000.tar.gz", 10, "bb", 100)]})
    assert key(rebuilt) != key(shards) and key(shards, 72) != key(shards)
    # a folder layout read in place: its files stand for it
    for split in ("train", "val"):
        (tmp_path / "folder" / split / "n01").mkdir(parents=True)
        (tmp_path / "folder" / split / "n01" / "a.JPEG").write_bytes(b"one")
    before = key(load_manifest(str(tmp_path / "folder")))
    assert key(load_manifest(str(tmp_path / "folder"))) == before
    (tmp_path / "folder" / "val" / "n01" / "a.JPEG").write_bytes(b"other")
    assert key(load_manifest(str(tmp_path / "folder"))) != before


def test_a_full_disk_falls_back_to_decoding_per_member(trained, monkeypatch, tmp_path, capsys):
    import errno

    record, cached, root = trained
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", full)
    fresh = recompute(record, root, "val", 4, 3, "none")
    assert "No space left on device" in capsys.readouterr().err
    assert list((tmp_path / "decoded").iterdir()) == []
    assert np.abs(np.asarray(fresh.array, dtype=np.float32) - cached.astype(np.float32)).max() < 1e-2


def test_served_model_applies_every_evaluated_option(trained, monkeypatch, tmp_path):
    """The pyfunc model with geometric combination, weights, temperatures and flip TTA
    predicts what the evaluation scored: same top classes, same probabilities."""
    from types import SimpleNamespace

    from ensemble.core import math as em
    from ensemble.core.serve import EnsembleModel, ensemble_spec
    from orchestrator.data.dataset import open_split

    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, _, root = trained
    a, b = record.model_copy(update={"name": "a"}), record.model_copy(update={"name": "b"})
    runs = SimpleNamespace(dataset=SimpleNamespace(class_names=None, num_classes=4))
    temps = {"a": 0.5, "b": 2.0}
    spec, artifacts = ensemble_spec(runs, [a, b], [0.7, 0.3], method="geometric", temperatures=temps, tta="flip")
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    served = EnsembleModel()
    served.load_context(SimpleNamespace(artifacts={**artifacts, "ensemble": str(tmp_path / "ensemble.yaml")}))
    split = open_split(root, "val", 4, 3)
    out = served.predict(None, [s.data for s in split.records])

    probs = torch.from_numpy(np.asarray(recompute(record, root, "val", 4, 3, "flip").array))
    evaluated = em.combine([em.apply_temperature(probs, temps["a"]), em.apply_temperature(probs, temps["b"])],
                           weights=[0.7, 0.3], method="geometric")
    top = evaluated.topk(4, dim=1)
    assert [[int(c) for c in row] for row in out["top5_classes"]] == top.indices.tolist()
    assert np.allclose(np.array(out["top5_probs"].tolist()), top.values.numpy(), atol=1e-4)
    plain = em.combine([probs, probs])  # what the old served model computed: not the evaluated ensemble
    assert not np.allclose(plain.topk(4, dim=1).values.numpy(), top.values.numpy(), atol=1e-3)


def test_tta_recomputes_the_minival_too_and_chooses_there(trained, monkeypatch, tmp_path):
    """With a minival in the runs file and test-time augmentation, both the minival (the
    carved part of train, named by its split) and val are recomputed with the same views;
    selection is fitted on the minival and every val row is reported."""
    import json

    from orchestrator.data.dataset import open_split

    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path))
    record, _, root = trained
    held = open_split(root, "train@minival:2:0", 4, 6)
    assert len(held) == 8 and sorted(s.label for s in held.records) == [0, 0, 1, 1, 2, 2, 3, 3]
    np.save(tmp_path / "val_labels.npy", np.array([s.label for s in open_split(root, "val", 4, 3).records]))
    np.save(tmp_path / "mv_labels.npy", np.array([s.label for s in held.records]))
    ds = {"name": "tiny", "uri": root, "num_classes": 4, "classes": 4}
    runs = {"version": 1, "ensemble": "t",
            "dataset": {**ds, "split": "val", "per_class": 3, "labels": str(tmp_path / "val_labels.npy")},
            "minival": {**ds, "split": "train@minival:2:0", "per_class": 6, "labels": str(tmp_path / "mv_labels.npy")},
            "members": [{**record.model_dump(mode="json"), "name": n, "minival_predictions": "unused-with-tta.npy"}
                        for n in ("a", "b")]}
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(runs))
    assert evaluate.main(["--members", str(tmp_path / "runs.yaml"), "--out", str(tmp_path / "rep"), "--no-mlflow",
                          "--json", str(tmp_path / "r.json"), "--tta", "flip", "--select", "greedy"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["selection"]["samples"] == 8 and report["dataset"]["samples"] == 12
    assert report["protocol"]["chosen_on"].startswith("train@minival:2:0")


def test_the_logged_ensemble_answers_base64_images_over_rest(trained, tmp_path, monkeypatch):
    """`mlflow models serve --env-manager local` on the logged ensemble, a real scoring
    server on 127.0.0.1: 64 base64 val JPEGs in `dataframe_split`, `dataframe_records` and
    an `inputs` list get the evaluation's combined probabilities (within 1e-6) and names (except
    at ties); a bad image is answered with its row named and what to send, no traceback
    and no echo of it, the other rows as usual."""
    import base64
    import socket
    import time
    import urllib.request

    import mlflow
    from types import SimpleNamespace

    from ensemble.core import math as em
    from ensemble.core.serve import log_ensemble_model
    from orchestrator.data.dataset import open_split

    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "cache"))
    record, _, root = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("serve")).info.run_id
    runs = SimpleNamespace(dataset=SimpleNamespace(class_names=["a", "b", "c", "d"], num_classes=4))
    model_uri = log_ensemble_model(runs, [record, record.model_copy(update={"name": "m2"})], [1.0, 1.0], run, uri)
    images = [s.data for s in open_split(root, "val", 4, 16).records]  # 64 val images
    local = mlflow.pyfunc.load_model(model_uri).predict(__import__("pandas").DataFrame({"image": images}))
    # the evaluation's combined probabilities for the same images (the recompute path, ensemble/core/predictions.py)
    evaluated = em.combine([torch.from_numpy(np.asarray(recompute(record, root, "val", 4, 16, "none").array))] * 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def post(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the scoring server did not start"
                time.sleep(0.5)
        b64 = [base64.b64encode(b).decode("ascii") for b in images]
        for body in ({"dataframe_split": {"columns": ["image"], "data": [[x] for x in b64]}},
                     {"dataframe_records": [{"image": x} for x in b64]}, {"inputs": b64}):
            status, answer = post(body)
            assert status == 200, answer
            rows = answer["predictions"]
            assert len(rows) == 64 and [r["top5_classes"] for r in rows] == list(local["top5_classes"])
            served = np.array([r["top5_probs"] for r in rows])
            order = evaluated.sort(dim=1, descending=True, stable=True)
            assert np.abs(served - order.values.numpy()).max() < 1e-6  # the evaluated ensemble, to 1e-6
            ties = np.isclose(served[:, :-1], served[:, 1:], rtol=0, atol=1e-6).any(1)
            names = [[chr(97 + int(i)) for i in row] for row in order.indices.tolist()]
            assert all(r["top5_classes"] == n for r, n, tie in zip(rows, names, ties) if not tie)
        status, answer = post({"dataframe_split": {"columns": ["image"],
                                                   "data": [[b64[0]], [base64.b64encode(b"not an image").decode()]]}})
        assert status == 200, answer  # the good row answered, the bad one named with what to send
        good, bad = answer["predictions"]
        assert good["top5_classes"] == list(local["top5_classes"])[0] and good["error"] == ""
        assert bad["top5_classes"] == [] and bad["error"].startswith("row 1: not a JPEG or PNG image; send each")
        assert "Traceback" not in json.dumps(answer) and "not an image" not in json.dumps(answer)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def predict_fixture(trained, tmp_path) -> tuple[Path, Path, list[bytes]]:
    """A runs file of two members and a folder of 6 val JPEGs and one broken file."""
    from orchestrator.data.dataset import open_split
    from orchestrator.records.runs_file import DatasetRef, RunsFile, write_runs

    record, _, root = trained
    np.save(tmp_path / "labels.npy", np.zeros(12, dtype=np.int64))
    runs = RunsFile(ensemble="p", dataset=DatasetRef(name="tiny", uri=root, num_classes=4,
                                                     labels=str(tmp_path / "labels.npy"),
                                                     class_names=["a", "b", "c", "d"]),
                    members=[record, record.model_copy(update={"name": "m2"})])
    write_runs(str(tmp_path / "runs.yaml"), runs)
    images = [s.data for s in open_split(root, "val", 4, 3).records[:6]]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, data in enumerate(images):
        (folder / ("sub" if i % 2 else "") / f"img{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return tmp_path / "runs.yaml", folder, images


def test_batch_prediction_writes_one_row_per_image(trained, tmp_path, capsys):
    import csv

    from ensemble import predict
    from ensemble.core.serve import Ensemble, ensemble_spec
    from orchestrator.records.runs_file import load_runs

    runs_path, folder, images = predict_fixture(trained, tmp_path)
    assert predict.main(["--members", str(runs_path), "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                         "--batch", "4"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["name"] for r in rows] == ["broken.jpg", "img0.jpg", "img2.jpg", "img4.jpg", "sub/img1.jpg",
                                         "sub/img3.jpg", "sub/img5.jpg"]
    assert rows[0]["error"] == "broken.jpg: not a JPEG or PNG image" and rows[0]["top5_classes"] == ""
    runs = load_runs(str(runs_path))
    direct = Ensemble(*ensemble_spec(runs, runs.members, [1.0, 1.0])).answer(
        [__import__("orchestrator.data.dataset", fromlist=["decode_rgb"]).decode_rgb(d) for d in images])
    by_name = {r["name"].rsplit("/", 1)[-1]: r for r in rows}
    for i in range(6):  # the served ensemble's answer, image by image
        row = by_name[f"img{i}.jpg"]
        assert row["top5_classes"].split(";") == direct["top5_classes"][i] and row["error"] == ""
        assert np.allclose([float(p) for p in row["top5_probs"].split(";")], direct["top5_probs"][i], atol=1e-5)
    assert "7 images, 2 members, 1 not decodable" in capsys.readouterr().out


@pytest.mark.stack
def test_batch_prediction_through_ray_data_on_the_local_ray_head(stack, trained, tmp_path):
    import csv

    runs_path, folder, _ = predict_fixture(trained, tmp_path)
    here, there = tmp_path / "here.csv", tmp_path / "ray.csv"
    for out, extra in ((here, []), (there, ["--address", os.environ["RAY_ADDRESS"], "--actors", "1"])):
        done = subprocess.run([sys.executable, "-m", "ensemble.predict", "--members", str(runs_path), "--images",
                               str(folder), "--out", str(out), *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    here_rows, ray_rows = list(csv.DictReader(open(here))), list(csv.DictReader(open(there)))
    assert [(r["name"], r["top5_classes"], r["error"]) for r in ray_rows] == \
        [(r["name"], r["top5_classes"], r["error"]) for r in here_rows]  # every image, the same answer
    for a, b in zip(ray_rows, here_rows):
        if not a["error"]:  # Ray Data's batches may be cut otherwise: the same floats to 1e-5
            assert np.allclose([float(x) for x in a["top5_probs"].split(";")],
                               [float(x) for x in b["top5_probs"].split(";")], atol=1e-5)
