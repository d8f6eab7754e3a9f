"""Serve an ensemble as one MLflow model.

`log_ensemble_model` packs every member's checkpoint, eval transform and weight, and every
option the evaluation applied (combination method, fitted temperatures, test-time
augmentation), into an MLflow pyfunc model; `mlflow.pyfunc.load_model(uri).predict(images)`
then returns the top-5 classes with their ensemble probabilities, computed as
`ensemble.evaluate` computed them: each member's views (ensemble/core/tta.py) of its own eval
geometry, softmaxes averaged over views, temperature applied, members combined by the
weighted mean or the geometric mean (ensemble/core/math.py). The served ensemble is the
evaluated one.

Input: a list of encoded images (JPEG/PNG bytes, or base64 strings of them: JSON carries
no bytes), a uint8 array [B, H, W, 3], or a DataFrame with an `image` column of either
(what MLflow's scoring server builds from `dataframe_split` and `dataframe_records`; `inputs`
takes a plain list of base64 strings; the model's signature says so). Output: a DataFrame with `top5_classes` (class
names) and `top5_probs`, the five most probable classes in descending order, ties in
class order (a stable sort, as the platform's top-k rule ranks them: ensemble/core/math.py).
A row whose image does not decode is answered with empty top-5 lists and its `error`
(the row named, what to send instead), the other rows as usual: MLflow's server would
answer a raised error with a 500 that echoes the payload.
"""
from __future__ import annotations

import base64
import binascii
import functools
import importlib
import os
import tempfile

import numpy as np
import torch
import yaml

from ensemble.core import math as em
from ensemble.core.stored import local_copy
from ensemble.core.tta import TTA_VIEWS, canvas, views
from models import load_checkpoint
from orchestrator.data.dataset import decode_rgb
from orchestrator.train.augment import EvalGeometry, normalize_batch

TOP_K = 5
IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG")  # JPEG, PNG


def _images(model_input) -> list[torch.Tensor | str]:
    """Each row's image, or for a row that holds none, what is wrong with it."""
    import pandas as pd  # on use, as MLflow's model stack below

    if isinstance(model_input, dict):
        model_input = model_input["image"]
    if isinstance(model_input, pd.DataFrame):  # the `image` column, or the one column a list became
        model_input = list(model_input["image"] if "image" in model_input else model_input.iloc[:, 0])
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim == 4:
        return [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) for img in model_input]
    return [_decoded(f"row {i}", item) for i, item in enumerate(model_input)]


def _decoded(label: str, item) -> torch.Tensor | str:
    """One image from its file bytes or their base64 text; else the row's error."""
    try:
        data = bytes(item, "ascii") if isinstance(item, str) else bytes(item)
        if not data.startswith(IMAGE_MAGIC):  # base64 text (MLflow's `inputs` form hands it over undecoded)
            data = base64.b64decode(data, validate=True)
        return decode_rgb(data)
    except (binascii.Error, ValueError, TypeError, RuntimeError):
        return (f"{label}: not a JPEG or PNG image; send each image's file bytes, base64-encoded, "
                f"in the `image` column")


class Ensemble:
    """The served ensemble without MLflow: members loaded once from `spec` (ensemble_spec)
    and their checkpoints (`artifacts`: key -> local path); `answer(rows)` gives the top-5
    of each decoded image, an error for each row that is not one. The pyfunc model and
    batch prediction (ensemble/predict.py) both use it."""

    def __init__(self, spec: dict, artifacts: dict[str, str]):
        self.class_names = spec["class_names"]
        self.method, self.tta = spec.get("method", "mean"), spec.get("tta", "none")
        self.members = []
        for m in spec["members"]:
            model, _ = load_checkpoint(artifacts[m["artifact"]], expect_arch=m["arch"])
            self.members.append((model.eval(), m["eval"], float(m["weight"]), m.get("temperature")))

    def member_probs(self, model, ev: dict, images: list[torch.Tensor]) -> torch.Tensor:
        """One member's probabilities, as the recompute path makes them (ensemble/core/predictions.py)."""
        geometry = EvalGeometry(*canvas(self.tta, ev["resize"], ev["crop"]))
        batch = normalize_batch(torch.stack([geometry(img) for img in images]), ev["mean"], ev["std"])
        return sum(model(v).float().softmax(1) for v in views(batch, self.tta, ev["crop"])) / TTA_VIEWS[self.tta]

    @torch.no_grad()
    def probs(self, images: list[torch.Tensor]) -> torch.Tensor:
        comb = em.Combiner(self.method)
        for model, ev, weight, temperature in self.members:
            p = self.member_probs(model, ev, images)
            comb.add(em.apply_temperature(p, temperature) if temperature else p, weight)
        return comb.result()

    def answer(self, rows: list) -> dict[str, list]:
        """{"top5_classes", "top5_probs", "error"} per row (ties in class order); a bad row
        gets empty lists and its error, the others as usual."""
        images = [r for r in rows if not isinstance(r, str)]
        k = min(TOP_K, len(self.class_names))
        values, indices = self.probs(images).sort(dim=1, descending=True, stable=True) if images else (None, None)
        out, j = {"top5_classes": [], "top5_probs": [], "error": []}, 0
        for r in rows:
            good = not isinstance(r, str)
            out["top5_classes"].append([self.class_names[i] for i in indices[j, :k].tolist()] if good else [])
            out["top5_probs"].append(values[j, :k].tolist() if good else [])
            out["error"].append("" if good else r)  # "" (not None: a DataFrame would make it NaN)
            j += good
        return out


@functools.cache
def ensemble_model_class():
    """The pyfunc model class, made on first use: MLflow's model stack (mlflow.pyfunc,
    pandas) loads only when an ensemble is logged or served, not with every evaluation."""
    import mlflow.pyfunc
    import pandas as pd

    class EnsembleModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            with open(context.artifacts["ensemble"]) as f:
                self.ensemble = Ensemble(yaml.safe_load(f), context.artifacts)

        def predict(self, context, model_input, params=None):
            return pd.DataFrame(self.ensemble.answer(_images(model_input)))

    return EnsembleModel


def __getattr__(name: str):
    if name == "EnsembleModel":  # `from ensemble.core.serve import EnsembleModel` still works
        return ensemble_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ensemble_spec(runs, records, weights, method: str = "mean", temperatures=None, tta: str = "none",
                  copy: bool = True) -> tuple[dict, dict[str, str]]:
    """(the served ensemble's spec, {artifact key: local checkpoint}) for the members of
    positive weight; `copy=False`: the checkpoints' URIs, for a process elsewhere to copy."""
    artifacts, members = {}, []
    temperatures = temperatures or {}
    for i, (m, w) in enumerate(zip(records, weights)):
        if w <= 0:
            continue
        key = f"member_{i}"
        artifacts[key] = local_copy(m.checkpoint, f"member {m.name} checkpoint") if copy else m.checkpoint
        members.append({"name": m.name, "arch": m.arch, "artifact": key, "eval": m.eval.model_dump(),
                        "weight": float(w), "temperature": temperatures.get(m.name)})
    class_names = runs.dataset.class_names or [str(i) for i in range(runs.dataset.num_classes)]
    return {"members": members, "class_names": class_names, "method": method, "tta": tta}, artifacts


def log_ensemble_model(runs, records, weights, client_run_id: str, tracking_uri: str, name: str = "ensemble",
                       method: str = "mean", temperatures=None, tta: str = "none"):
    """Log the ensemble as a pyfunc model to run `client_run_id`; returns the model URI."""
    import mlflow  # on use (see ensemble_model_class)

    spec, artifacts = ensemble_spec(runs, records, weights, method, temperatures, tta)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ensemble.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        artifacts["ensemble"] = path
        example = input_example(records)
        with mlflow.start_run(run_id=client_run_id):
            info = mlflow.pyfunc.log_model(name=name, python_model=ensemble_model_class()(), artifacts=artifacts,
                                           code_paths=[_package_dir("models"), _package_dir("orchestrator"),
                                                       _package_dir("ensemble")],
                                           signature=signature(), input_example=example,
                                           pip_requirements=requirements())
    return info.model_uri


def requirements() -> list[str]:
    """The packages the model imports, pinned to this environment's versions: given, so
    MLflow does not load the model in a subprocess to infer them at every log (seconds
    each); `--env-manager local` serves from this environment anyway."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pyyaml", "pydantic",
                                            "fsspec", "timm")]


def signature():
    """Images in one binary column (MLflow's scoring server takes them as base64 strings in
    JSON and hands the model bytes); the top five class names and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    # unnamed: MLflow matches a list of bytes (in process) and an `image` column (REST) by position
    return ModelSignature(inputs=Schema([ColSpec("binary")]),
                          outputs=Schema([ColSpec(Array("string"), "top5_classes"),
                                          ColSpec(Array("double"), "top5_probs"),
                                          ColSpec("string", "error", required=False)]))


def input_example(records):
    """One request's rows: a grey 32 px JPEG (MLflow stores it base64-encoded, as a client sends it)."""
    import pandas as pd
    from torchvision.io import encode_jpeg

    return pd.DataFrame({"image": [encode_jpeg(torch.full((3, 32, 32), 128, dtype=torch.uint8)).numpy().tobytes()]})


def _package_dir(name: str) -> str:
    return os.path.dirname(importlib.import_module(name).__file__)
