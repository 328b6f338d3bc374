"""The EvalRun CustomResourceDefinition, generated from the pydantic models.

`models.EvalRunSpec` and `models.EvalRunStatus` are the single source of the
schema. Pydantic emits JSON Schema (draft 2020-12); the API server wants a
*structural* OpenAPI v3 schema, so `structural()` rewrites it:

- every `$ref` is inlined (no `$ref`/`$defs` survive);
- `X | None` (an `anyOf` with a `null` branch) becomes `X`: an omitted field
  means "not set", and the API server prunes an explicit null of a
  non-nullable field before validation;
- the JSON-valued case fields (`input`, `expected`) become
  `x-kubernetes-preserve-unknown-fields: true` with no type (any JSON value,
  null included); free-form maps (`metadata`) become objects that preserve
  unknown fields;
- `title` and `default` are dropped. Defaults are not written into stored
  objects: the controller applies them through the same models, so a
  manifest stays as its author wrote it (and a configMapRef suite does not
  sprout inline fields that its CEL rule forbids). Each default is named in
  the field's description instead, for `kubectl explain`;
- draft 2020-12 numeric `exclusiveMinimum: n` becomes OpenAPI's
  `minimum: n, exclusiveMinimum: true`;
- `additionalProperties: false` goes (unknown fields are pruned, or refused
  by `kubectl`'s strict field validation);
- a string that a CEL rule reads carries a `maxLength` (set in the model),
  and every list a rule runs over a `maxItems`, so the API server's cost
  estimate stays within its budget.

`x-kubernetes-*` keys come from the models' `json_schema_extra`, next to the
pydantic validators they mirror.

Regenerate the committed manifest with:

    python -m evalrunner.crd --write
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from .models import EvalRunSpec, EvalRunStatus

GROUP = "evals.workshop.dev"
VERSION = "v1alpha1"
KIND = "EvalRun"
PLURAL = "evalruns"
SINGULAR = "evalrun"
SHORT_NAMES = ["er"]
CATEGORIES = ["evals"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / f"{CRD_NAME}.yaml"
# The Helm chart ships the same file (Helm installs charts/*/crds/ before templates).
CHART_CRD_PATH = REPO_ROOT / "charts" / "evalrunner" / "crds" / f"{CRD_NAME}.yaml"
REGENERATE = "python -m evalrunner.crd --write"

KIND_DESCRIPTION = (
    "EvalRun runs eval suites as Kubernetes Jobs, one Job per suite, and records every run in the "
    "evalrunner store. The operator terminates the run of a runner pod that dies (OOM, eviction, node "
    "loss, deletion, deadline) within seconds, with a classified cause."
)

def _column(name: str, kind: str, path: str, description: str | None = None, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority  # 1: shown by `kubectl get -o wide` only
    return column


# "Suites" shows status.progress ("1/2"): a printer column cannot count a list.
PRINTER_COLUMNS = [
    _column("Phase", "string", ".status.phase", "Pending, Running, Succeeded or Failed."),
    _column("Suites", "string", ".status.progress", "Finished suites out of all suites."),
    _column("Passed", "integer", ".status.passed", "Cases that passed."),
    _column("Failed", "integer", ".status.failed", "Cases scored as failing."),
    _column("Errored", "integer", ".status.errored", "Cases that errored (could not be evaluated)."),
    _column("Age", "date", ".metadata.creationTimestamp"),
]

# Keys of JSON Schema that a structural schema must not carry (or that mean
# nothing to the API server).
_DROPPED = {"title", "default", "$defs", "examples"}


class SchemaError(ValueError):
    """The models use a JSON Schema construct this converter does not turn into a structural schema."""


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest for EvalRun (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def open_api_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of the EvalRun resource."""
    return {
        "type": "object",
        "description": KIND_DESCRIPTION,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: evals.workshop.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: EvalRun."},
            "metadata": {"type": "object"},
            "spec": structural(EvalRunSpec.model_json_schema(by_alias=True)),
            "status": structural(EvalRunStatus.model_json_schema(by_alias=True)),
        },
    }


def structural(json_schema: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON Schema (with its `$defs`) into a structural OpenAPI v3 schema."""
    return _convert(json_schema, json_schema.get("$defs", {}))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _inline_ref(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        node = _collapse_union(node, defs)
        if "anyOf" not in node and "$ref" in node:
            node = _inline_ref(node, defs)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict) and value:
                out[key] = _convert(value, defs)
            # `false` (extra="forbid"): the API server prunes unknown fields.
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "anyOf":
            out[key] = copy.deepcopy(value)  # the int-or-string pattern, kept verbatim
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings are wrapped; `kubectl explain` wraps again
        else:
            out[key] = copy.deepcopy(value)

    _describe_default(node, out)
    if "properties" in out:
        out["type"] = "object"
    if out.get("type") == "array" and "items" not in out:
        out["items"] = {"x-kubernetes-preserve-unknown-fields": True}
    if out.get("type") == "object" and not out.get("properties") and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _inline_ref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Replace a `$ref` by its definition; the referring node's own keys (a field's description) win."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    if name not in defs:
        raise SchemaError(f"unresolvable $ref {node['$ref']!r}")
    merged = dict(defs[name])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return _inline_ref(merged, defs)


def _is_json_value_union(branches: list[dict[str, Any]]) -> bool:
    """`models.JsonValue`: a union of (at least) object, array and scalars."""
    types = {b.get("type") for b in branches}
    return {"object", "array", "string"} <= types


def _collapse_union(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    branches = node["anyOf"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if _is_json_value_union(branches):
        # Any JSON value: no type, so a structural schema needs preserve-unknown-fields.
        rest.pop("type", None)
        rest["x-kubernetes-preserve-unknown-fields"] = True
        if any(b.get("type") == "null" for b in branches):
            rest["nullable"] = True
        return rest
    non_null = [b for b in branches if b.get("type") != "null"]
    if len(non_null) != 1:
        raise SchemaError(f"a union of {len(non_null)} types has no structural schema: {branches}")
    merged = dict(non_null[0])
    merged.update(rest)  # the field's description and extensions win over the type's
    return merged


def _describe_default(node: dict[str, Any], out: dict[str, Any]) -> None:
    """Name a scalar default in the description (defaults are applied by the models, not the API server)."""
    default = node.get("default")
    if default is None or default == "" or isinstance(default, (dict, list)):
        return
    text = str(default).lower() if isinstance(default, bool) else str(default)
    description = out.get("description", "")
    if "Default:" in description:
        return
    out["description"] = f"{description} Default: {text}.".strip()


def render(crd: dict[str, Any] | None = None) -> str:
    """The manifest as committed: YAML with a header that says how to regenerate it."""
    body = yaml.safe_dump(crd or build_crd(), sort_keys=False, width=120, allow_unicode=True)
    return f"# Generated from operator/evalrunner/models.py; do not edit. Regenerate: {REGENERATE}\n{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalrunner.crd", description="Print the EvalRun CRD.")
    parser.add_argument("--write", action="store_true",
                        help=f"write {CRD_PATH.relative_to(REPO_ROOT)} and the chart's copy instead")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        for path in (CRD_PATH, CHART_CRD_PATH):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
