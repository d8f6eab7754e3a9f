"""Property-based tests of the two loaders users hand-edit: the ensemble config and
runs.yaml. Whatever the input, the result is a valid object or one UserError line,
never a traceback."""
from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import parse_config, resolve_members
from orchestrator.base.errors import UserError
from orchestrator.records.runs_file import load_runs

KEYS = ["name", "data", "root", "classes", "members", "arch", "recipe", "recipes", "epochs", "optimizer", "lr",
        "schedule", "policy", "params", "augment", "preset", "overrides", "grid", "archs", "seeds", "resources",
        "workers", "use_gpu", "defaults", "search", "space", "choice", "uniform", "mlflow", "storage", "ray",
        "label_shuffling", "cam_crops", "teacher", "version", "ensemble", "dataset", "labels", "eval",
        "num_classes", "metrics", "status", "weight", "crop", "resize", "input_size", "mean", "std", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True),
                    st.sampled_from(["resnet18", "cosine", "standard", "x", "", "s3://b/k", "finished", "1e-3"]),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)

VALID_CONFIG = {
    "name": "fuzz", "data": {"root": "/data", "classes": 3},
    "recipes": {"r": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"policy": "poly"},
                      "augment": {"preset": "light", "overrides": {"color_jitter": 0.2}}}},
    "defaults": {"input_size": 32},
    "members": [{"arch": "resnet18", "recipe": "r", "resources": {"workers": 2}}],
    "grid": {"archs": ["vgg11_bn"], "recipes": ["r"], "seeds": [0, 1]},
}
VALID_RUNS = {
    "version": 1, "ensemble": "e",
    "dataset": {"name": "tiny", "uri": "/data", "num_classes": 3, "labels": "/l.npy", "samples": 9},
    "members": [{"name": "m", "key": "m-1", "arch": "resnet18", "checkpoint": "/c.pt", "predictions": "/p.npy",
                 "eval": {"input_size": 32, "resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                 "metrics": {"top1_err": 0.5}}],
}


def paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, prefix + (i,))


def mutate(tree, path, value):
    tree = copy.deepcopy(tree)
    if not path:
        return value
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return tree


def config_outcome(raw) -> None:
    try:
        if not isinstance(raw, dict):
            raise UserError("not a mapping")  # load_config's own check
        resolve_members(parse_config(raw))
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_any_config_document_loads_or_fails_with_one_line(raw):
    config_outcome(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(paths(VALID_CONFIG))), values)
def test_a_valid_config_with_one_field_replaced_loads_or_fails_with_one_line(path, value):
    config_outcome(mutate(VALID_CONFIG, path, value))


def runs_outcome(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("runs") / "runs.yaml"
    path.write_text(text)
    try:
        runs = load_runs(str(path))
        assert runs.members is not None and runs.dataset.num_classes >= 1
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.sampled_from(list(paths(VALID_RUNS))), values)
def test_a_hand_edited_runs_file_loads_or_fails_with_one_line(tmp_path_factory, path, value):
    runs_outcome(tmp_path_factory, yaml.safe_dump(mutate(VALID_RUNS, path, value)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), values.map(yaml.safe_dump)))
def test_any_runs_file_text_loads_or_fails_with_one_line(tmp_path_factory, text):
    runs_outcome(tmp_path_factory, text)
