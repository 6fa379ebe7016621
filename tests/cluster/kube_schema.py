"""Validate Kubernetes manifests against CRD openAPIV3Schemas with jsonschema, as the API server would.

The API server's structural-schema rules are mapped onto JSON Schema:
- objects with ``properties`` and no ``x-kubernetes-preserve-unknown-fields`` refuse unknown
  fields (``kubectl apply --validate=strict`` refuses them; a lenient server would drop them
  silently, which is worse: a misspelt field would be ignored);
- ``x-kubernetes-int-or-string`` accepts an integer or a string;
- ``x-kubernetes-embedded-resource`` objects may carry apiVersion, kind and metadata;
- ``nullable`` allows null.
CEL rules (``x-kubernetes-validations``) and ``format`` (int32, ...) are not evaluated.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "kuberay-crds"
needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"the KubeRay v1.7.0 CRDs are not at {CRD_DIR} (a clone without ../shared)"
)


def to_json_schema(node: Any) -> Any:
    """A copy of a CRD schema node rewritten for jsonschema (see the module docstring)."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every CRD in CRD_DIR."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # the CRDs are ~1 MB each
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# The few built-in kinds the manifests use, checked for shape (a cluster's own schemas are not here).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
}
BUILTIN_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "ConfigMap"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "data"],
        "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _METADATA, "data": _STRING_MAP},
    },
    ("v1", "Secret"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "type": {"type": "string"},
            "data": _STRING_MAP,
            "stringData": _STRING_MAP,
        },
    },
    ("v1", "PersistentVolumeClaim"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "properties": {
                    "accessModes": {
                        "type": "array",
                        "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                    },
                    "storageClassName": {"type": "string"},
                    "resources": {
                        "type": "object",
                        "properties": {"requests": {"type": "object", "required": ["storage"]}},
                    },
                },
            },
        },
    },
}


def schema_for(document: dict[str, Any]) -> dict[str, Any]:
    """The schema for a manifest document; KeyError for a kind nobody can check."""
    key = (document.get("apiVersion", ""), document.get("kind", ""))
    return crd_schemas().get(key) or BUILTIN_SCHEMAS[key]


def validation_errors(document: dict[str, Any]) -> list[str]:
    """Every schema violation in one manifest document, as 'path: message' lines."""
    try:
        schema = schema_for(document)
    except KeyError:
        return [f"no schema for apiVersion={document.get('apiVersion')!r} kind={document.get('kind')!r}"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}" for err in validator.iter_errors(document)
    ]
    metadata = document.get("metadata") or {}
    if not (metadata.get("name") or metadata.get("generateName")):
        errors.append("metadata: name or generateName is required")
    return sorted(errors)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a manifest file (anchors resolved)."""
    # A JSON round trip un-shares anchored nodes, so a test can change one place without the others.
    return [json.loads(json.dumps(doc)) for doc in yaml.safe_load_all(path.read_text()) if doc]
