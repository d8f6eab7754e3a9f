"""infra/ validated offline: the Kubernetes manifests against the official client's models
and the vendored KubeRay schema (base and the kind overlay, built as kustomize would),
the AWS cluster-launcher config against Ray's own schema; secrets only by reference."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonpatch
import jsonschema
import pytest
import yaml
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
KUBERAY = json.loads((K8S / "schemas" / "kuberay-v1.json").read_text())
MODELS = {"Deployment": "V1Deployment", "Service": "V1Service", "StatefulSet": "V1StatefulSet",
          "ServiceAccount": "V1ServiceAccount", "ConfigMap": "V1ConfigMap"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base, patch):
    """Strategic-merge for the maps our patches touch (lists are replaced)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return patch


def build(folder: Path) -> list[dict]:
    """`kustomize build`, for the features these kustomizations use."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        objects += build(path) if path.is_dir() else _docs(path)
    for p in k.get("patches", []):
        if "path" in p:
            for patch in _docs(folder / p["path"]):
                target = [o for o in objects if (o["kind"], o["metadata"]["name"]) ==
                          (patch["kind"], patch["metadata"]["name"])]
                assert len(target) == 1, f"patch {p['path']} matches {len(target)} objects"
                objects[objects.index(target[0])] = _merge(target[0], patch)
        else:
            t = p["target"]
            target = [o for o in objects if o["kind"] == t["kind"] and o["metadata"]["name"] == t["name"]]
            assert len(target) == 1, f"patch for {t} matches {len(target)} objects"
            ops = yaml.safe_load(p["patch"])
            objects[objects.index(target[0])] = jsonpatch.apply_patch(target[0], ops)
    return objects


def check_k8s(data: dict, model: str) -> None:
    """A document is valid if the client's model takes it and gives it back unchanged:
    an unknown field is dropped and a wrong type raises or changes, so both show."""
    api = ApiClient()
    obj = api._ApiClient__deserialize(copy.deepcopy(data), model)
    back = api.sanitize_for_serialization(obj)
    assert back == data, f"{model}: {json.dumps(data)[:200]} does not round-trip: {json.dumps(back)[:200]}"


def pod_templates(obj: dict) -> list[dict]:
    spec = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"].get("rayClusterSpec")
    if not spec:
        return []
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def check(obj: dict) -> None:
    kind = obj["kind"]
    assert kind != "Secret", "secrets are referenced (secretKeyRef / secretRef), never written in manifests"
    if kind in ("RayCluster", "RayJob"):
        jsonschema.validate(obj, {**KUBERAY[kind], "definitions": KUBERAY["definitions"]})
        for template in pod_templates(obj):
            check_k8s(template, "V1PodTemplateSpec")
    else:
        assert kind in MODELS, f"no schema for kind {kind}"
        check_k8s(obj, MODELS[kind])


@pytest.mark.parametrize("folder", ["base", "overlays/kind"])
def test_every_manifest_is_valid(folder):
    objects = build(K8S / folder)
    kinds = sorted(o["kind"] for o in objects)
    assert {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap", "ServiceAccount"} <= set(kinds)
    for obj in objects:
        check(obj)


def test_the_cluster_has_an_autoscaled_gpu_group_and_the_kind_overlay_none():
    base = {o["kind"]: o for o in build(K8S / "base")}
    groups = {g["groupName"]: g for g in base["RayCluster"]["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert base["RayCluster"]["spec"]["enableInTreeAutoscaling"] and gpu["minReplicas"] < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    kind = {(o["kind"], o["metadata"]["name"]): o for o in build(K8S / "overlays" / "kind")}
    kgroups = {g["groupName"]: g for g in kind[("RayCluster", "ensembles")]["spec"]["workerGroupSpecs"]}
    assert kgroups["gpu"]["maxReplicas"] == 0 and kgroups["cpu"]["template"]["spec"]["containers"][0]["image"]
    assert ("StatefulSet", "postgres") in kind and kind[("ConfigMap", "ensembles-env")]["data"]["AWS_ENDPOINT_URL"]
    assert "configs/smoke.yaml" in kind[("RayJob", "tiny-imagenet-20")]["spec"]["entrypoint"]
    mlflow = kind[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e.get("valueFrom", {}) for e in mlflow["env"]}
    assert refs["MLFLOW_BACKEND_STORE_URI"] == {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}


def test_the_validators_catch_unknown_fields_and_wrong_types():
    base = {(o["kind"], o["metadata"]["name"]): o for o in build(K8S / "base")}
    deployment = copy.deepcopy(base[("Deployment", "mlflow")])
    deployment["spec"]["replica"] = 2
    with pytest.raises(AssertionError, match="does not round-trip"):
        check(deployment)
    deployment = copy.deepcopy(base[("Deployment", "mlflow")])
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"] = "5000"
    with pytest.raises((AssertionError, ValueError, TypeError, AttributeError)):
        check(deployment)
    cluster = copy.deepcopy(base[("RayCluster", "ensembles")])
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        check(cluster)
    cluster = copy.deepcopy(base[("RayCluster", "ensembles")])
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(AssertionError):
        check(cluster)


def test_no_credentials_are_written_in_infra():
    # placeholders ("...") and references ("${VAR}") are fine; values are not
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*(?!\.\.\.|\$)\S+|"
                         r"password[:=]\s*(?!\.\.\.|\$)\S+", re.I)
    local_stack = ROOT / "infra" / "local" / "env.sh"  # the loopback S3 server's own throwaway keys
    for path in (ROOT / "infra").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".sh") and path != local_stack:
            assert not pattern.search(path.read_text()), f"{path} holds a credential"


def test_the_aws_cluster_config_follows_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "infra" / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    head, workers = nodes[cfg["head_node_type"]], [v for k, v in nodes.items() if k != cfg["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand head
    assert all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers)
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())  # S3 through the role
    assert any(w["min_workers"] < w["max_workers"] for w in workers)
    policy = json.loads((ROOT / "infra" / "aws" / "iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
