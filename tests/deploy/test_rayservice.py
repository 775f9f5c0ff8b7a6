"""deploy/rayservice.yaml against the KubeRay RayService CRD's fields (no cluster) and its Serve config
against Ray Serve's own schema and our ``build_app``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
CRD = Path(__file__).with_name("rayservice_crd_v1.json")  # where it came from: its "_source"

_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
                                       "boolean": (bool,), "number": (int, float)}


def violations(value: Any, schema: dict[str, Any], at: str = "") -> list[str]:
    """What in ``value`` the (pruned) OpenAPI v3 schema refuses: wrong types, missing required fields,
    fields the CRD does not have (the API server would drop them silently), values outside an enum."""
    if not schema:
        return []
    found: list[str] = []
    if schema.get("int_or_string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    elif "type" in schema:
        ok = isinstance(value, _TYPES[schema["type"]]) and not (schema["type"] == "integer" and isinstance(value, bool))
    else:
        ok = True
    if not ok:
        return [f"{at or '/'}: expected {schema.get('type', 'int or string')}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        found += [f"{at}.{k}: required" for k in schema.get("required", []) if k not in value]
        if "properties" in schema:
            for k, v in value.items():
                if k not in schema["properties"]:
                    found.append(f"{at}.{k}: no such field in the CRD")
                else:
                    found += violations(v, schema["properties"][k], f"{at}.{k}")
        elif "additionalProperties" in schema:
            for k, v in value.items():
                found += violations(v, schema["additionalProperties"], f"{at}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += violations(item, schema["items"], f"{at}[{i}]")
    return found


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return {k: v for k, v in json.loads(CRD.read_text()).items() if k != "_source"}


def test_manifest_fits_the_rayservice_crd(manifest: dict[str, Any], crd: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert violations(manifest, crd) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replica=2), "no such field"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName: required"),
    (lambda m: m["spec"].update(serveConfigV2={"applications": []}), "expected string"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
     "expected string"),
], ids=["misspelt-field", "missing-required", "serve-config-not-a-string", "start-param-not-a-string"])
def test_the_check_catches_what_kubernetes_would_refuse(manifest: dict[str, Any], crd: dict[str, Any], mutate: Any,
                                                       expected: str) -> None:
    broken = copy.deepcopy(manifest)
    mutate(broken)
    assert any(expected in v for v in violations(broken, crd)), violations(broken, crd)


def test_serve_config_is_valid_for_ray_and_builds_our_app(manifest: dict[str, Any]) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'bptvlm[ray]'")
    from ray.serve.schema import ServeDeploySchema

    from bptvlm.server import ray_engine

    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    assert (module, name) == ("bptvlm.server.ray_engine", "build_app")
    bound = ray_engine.build_app(app.args)._bound_deployment  # every other arg is a server setting
    assert bound.num_replicas == 2 and bound.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    env = {e["name"]: e.get("value") for e in
           manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[ray_engine.PROXY_CALLBACK_ENV] == ray_engine.PROXY_CALLBACK
