"""Validation of custom resources against the OpenAPI schemas of their CustomResourceDefinitions.

The CRDs are vendored in deploy/tests/crds/ (crds/README.md names their source, commit and licence):
the Prometheus Operator's PodMonitor, ServiceMonitor and PrometheusRule, and KEDA's ScaledObject.
An object is validated against `spec.versions[].schema.openAPIV3Schema` of the version it names,
made strict the way the API server's strict field validation (`kubectl apply`'s default) is: a
field the schema does not know is an error, not silently pruned. What JSON Schema cannot check is
not checked here: the CEL rules (x-kubernetes-validations) and `format`s. The object's metadata,
which a CRD schema leaves open, is checked against the Kubernetes ObjectMeta schema instead.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"


def _strict(schema: Any) -> Any:
    """A copy of `schema` in which every object with declared properties refuses others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict schema of every served version of the vendored CRDs."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = _strict(v["schema"]["openAPIV3Schema"])
    return out


def kinds() -> set[str]:
    return {kind for _, kind in schemas()}


def validate(obj: dict[str, Any]) -> None:
    """Raises AssertionError naming the object and the path of the first violation."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = schemas().get(key)
    assert schema is not None, f"no vendored CRD serves {key}: {sorted(schemas())}"
    body = copy.deepcopy(obj)
    body.pop("metadata", None)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {path}: {e.message}"
                             f" ({len(errors)} error(s))")
