"""The served OpenAPI document made true to what the server does (FastAPI's own describes its defaults instead).

- Every error is `ErrorBody` (`{"error", "detail"}`), a 422 too: FastAPI documents its `HTTPValidationError`, which
  the server never sends (errors.py).
- Text: no field takes a NUL character (models.BaseModel refuses it anywhere: PostgreSQL cannot store it), so every
  string without a stricter pattern gets `^[^\\x00]*$`.
- Free-form documents (desired/reported state, config overrides, device-type defaults) are JSON objects at most
  `DOC_DEPTH` levels deep (documents.check_depth; a type's JSON schema: `SCHEMA_DEPTH`) whose strings and keys
  follow the same rule: spelled out as a depth-limited family of schemas (`JsonObject`, `JsonObject1..`), not
  `additionalProperties: true`.
- The statuses every operation can answer besides its own: 400 (malformed JSON) and 413 (body too large) where it
  takes a body, 422 (invalid input) where it takes any, 503 (admission control, database queue).
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .documents import SCHEMA_DEPTH

NO_NUL = "^[^\\x00]*$"
DOC_DEPTH = 6  # Settings.max_doc_depth's default
_ERROR = {"$ref": "#/components/schemas/ErrorBody"}
_COMMON = {"400": "malformed request (JSON that does not parse, nested too deeply)",
           "413": "request body too large", "422": "invalid input: `detail.path` names the field",
           "503": "server busy, retry later (Retry-After)"}
_FREE = {"additionalProperties": True, "type": "object"}


def _family(name: str, levels: int) -> dict[str, Any]:
    """`name`: a JSON object at most `levels` deep, its strings and keys without NUL; `name1..` its inner values."""
    scalars = [{"type": "string", "pattern": NO_NUL}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    out: dict[str, Any] = {f"{name}0": {"anyOf": scalars}}
    for k in range(1, levels + 1):
        obj = {"type": "object", "propertyNames": {"pattern": NO_NUL},
               "additionalProperties": {"$ref": f"#/components/schemas/{name}{k - 1}"}}
        if k == levels:
            out[name] = {**obj, "description": f"a JSON object at most {levels} levels deep; no NUL character in any "
                                               "string or key"}
        else:
            out[f"{name}{k}"] = {"anyOf": [*scalars, obj, {"type": "array", "items": {
                "$ref": f"#/components/schemas/{name}{k - 1}"}}]}
    return out


def _strings(node: Any) -> None:
    """Add NO_NUL to every plain string schema under node."""
    if isinstance(node, dict):
        if node.get("type") == "string" and not ({"pattern", "enum", "format", "const"} & node.keys()):
            node["pattern"] = NO_NUL
        for v in node.values():
            _strings(v)
    elif isinstance(node, list):
        for v in node:
            _strings(v)


def _free_documents(node: Any, ref: str = "JsonObject") -> Any:
    if isinstance(node, dict):
        if {k: v for k, v in node.items() if k not in ("title", "description")} == _FREE:
            return {"$ref": f"#/components/schemas/{ref}", **{k: node[k] for k in ("title", "description")
                                                               if k in node}}
        return {k: _free_documents(v, "JsonSchema" if k == "json_schema" else ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_free_documents(v, ref) for v in node]
    return node


def refine(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for name in list(schemas):
        if name.endswith("In"):  # what clients send
            schemas[name] = _free_documents(schemas[name])
            _strings(schemas[name])
    schemas.update(_family("JsonObject", DOC_DEPTH))
    schemas.update(_family("JsonSchema", SCHEMA_DEPTH))
    # a shadow update names at least one of its two sections (state_api.check_writer: 400 otherwise)
    if "ShadowStateIn" in schemas:
        schemas["ShadowStateIn"]["anyOf"] = [{"required": [s], "properties": {s: {"type": "object"}}}
                                             for s in ("desired", "reported")]
    # an OTA assignment names a device or a group, not both (ota_api.py: 422 otherwise)
    if "AssignIn" in schemas:
        schemas["AssignIn"]["anyOf"] = [{"required": [a], "properties": {a: {"type": "string"}, b: {"type": "null"}}}
                                        for a, b in (("device", "group"), ("group", "device"))]
    for ops in doc.get("paths", {}).values():
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            for p in op.get("parameters", []):
                if p.get("name") == "sha256" and p.get("in") == "path":  # an OTA file is named by its hash
                    p["schema"] = {**p["schema"], "pattern": "^[0-9a-f]{64}$"}
                _strings(p.get("schema"))
            responses = op["responses"]
            for status, why in _COMMON.items():
                if status in ("400", "413") and "requestBody" not in op:
                    continue
                if status == "422" and not (op.get("parameters") or "requestBody" in op):
                    continue
                responses.setdefault(status, {"description": why})
                responses[status]["content"] = {"application/json": {"schema": _ERROR}}
    return doc


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = refine(get_openapi(title=app.title, version=app.version,
                                                    description=app.description, routes=app.routes))
        return app.openapi_schema
    app.openapi = openapi  # type: ignore[method-assign]
