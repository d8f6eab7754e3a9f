"""Serve an ensemble as one MLflow model.

`log_ensemble_model` packs every member's checkpoint, eval transform and weight into an
MLflow pyfunc model; `mlflow.pyfunc.load_model(uri).predict(images)` then returns the
top-5 classes with their ensemble probabilities (weighted mean of member softmaxes, each
member fed through its own eval transform).

Input: a list of encoded images (JPEG/PNG bytes), a uint8 array [B, H, W, 3], or a
DataFrame with an `image` column of bytes. Output: a DataFrame with `top5_classes`
(class names) and `top5_probs`.
"""
from __future__ import annotations

import os
import tempfile

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import yaml

TOP_K = 5


def _images(model_input) -> list[torch.Tensor]:
    from orchestrator.data.dataset import decode_rgb

    if isinstance(model_input, pd.DataFrame):
        model_input = list(model_input["image"])
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim == 4:
        return [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) for img in model_input]
    return [decode_rgb(bytes(b)) for b in model_input]


class EnsembleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from models import load_checkpoint
        from orchestrator.train.augment import build_eval_transform

        with open(context.artifacts["ensemble"]) as f:
            spec = yaml.safe_load(f)
        self.class_names = spec["class_names"]
        self.members = []
        for m in spec["members"]:
            model, _ = load_checkpoint(context.artifacts[m["artifact"]], expect_arch=m["arch"])
            ev = m["eval"]
            self.members.append((model.eval(), build_eval_transform(ev["resize"], ev["crop"], ev["mean"], ev["std"]),
                                 float(m["weight"])))

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        images = _images(model_input)
        total = sum(w for _, _, w in self.members)
        probs = 0
        for model, transform, weight in self.members:
            batch = torch.stack([transform(img) for img in images])
            probs = probs + weight * model(batch).softmax(1)
        probs = probs / total
        top = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        return pd.DataFrame({"top5_classes": [[self.class_names[i] for i in row] for row in top.indices.tolist()],
                             "top5_probs": top.values.tolist()})


def log_ensemble_model(runs, records, weights, client_run_id: str, tracking_uri: str, name: str = "ensemble"):
    """Log the ensemble as a pyfunc model to run `client_run_id`; returns the model URI."""
    from ensemble.predictions import local_copy

    artifacts, members = {}, []
    for i, (m, w) in enumerate(zip(records, weights)):
        if w <= 0:
            continue
        key = f"member_{i}"
        artifacts[key] = local_copy(m.checkpoint, f"member {m.name} checkpoint")
        members.append({"name": m.name, "arch": m.arch, "artifact": key, "eval": m.eval.model_dump(),
                        "weight": float(w)})
    class_names = runs.dataset.class_names or [str(i) for i in range(runs.dataset.num_classes)]
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "ensemble.yaml")
        with open(spec, "w") as f:
            yaml.safe_dump({"members": members, "class_names": class_names}, f)
        artifacts["ensemble"] = spec
        with mlflow.start_run(run_id=client_run_id):
            info = mlflow.pyfunc.log_model(name=name, python_model=EnsembleModel(), artifacts=artifacts,
                                           code_paths=[_package_dir("models"), _package_dir("orchestrator"),
                                                       _package_dir("ensemble")])
    return info.model_uri


def _package_dir(name: str) -> str:
    import importlib

    return os.path.dirname(importlib.import_module(name).__file__)
