"""The built-in device types (`relays`, `sensors`): default configs and JSON schemas, plus schema validation.

The firmware is the source of the config contract: its compact schema (iotlib/device.py and each controller's
`schema()`), its defaults, and iotlib/relays.py. These schemas name the same keys, types, enums and ranges, and these
defaults are what a device runs when the control plane says nothing; tests/controlplane/test_config_contract.py
proves that they agree (docs/control-plane.md, *Device types*). Sections are strict about the types of the fields
they know and permissive about extra keys, so a newer firmware can add fields.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

from .refusals import Invalid

_COMMON_PROPS: dict[str, Any] = {
    "heartbeat_interval_s": {"type": "integer", "minimum": 1, "maximum": 3600},
    "time": {"type": "object", "properties": {
        "servers": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        "interval_s": {"type": "integer", "minimum": 16, "maximum": 86400},
    }},
    "api": {"type": "object", "properties": {
        "token_hashes": {"type": "array", "maxItems": 16,
                         "items": {"type": "string", "minLength": 64, "maxLength": 64, "pattern": "^[0-9a-f]{64}$"}},
        # static tokens with a role (the device checks the fields: iotlib/device.py, _apply_api)
        "tokens": {"type": "array", "maxItems": 16, "items": {
            "type": "object", "required": ["sha256", "role"], "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                "role": {"enum": ["viewer", "operator", "admin"]}}}},
        "rate_per_s": {"type": "number", "minimum": 0.001, "maximum": 1000},
        "burst": {"type": "integer", "minimum": 1, "maximum": 1000},
    }},
    "log": {"type": "object", "properties": {
        "level": {"enum": ["debug", "info", "warning", "error", "critical"]},
    }},
}

_COMMON_DEFAULTS: dict[str, Any] = {
    "heartbeat_interval_s": 10,
    # no public NTP pool by default: the device syncs with the control plane's SNTP responder, which registration
    # advertises (services.ntp, `picoiot server --sntp-port`), and sets its clock from server_time until then
    "time": {"servers": [], "interval_s": 3600},
    # no `api.tokens`: a board's own static tokens come from its settings file (`api_tokens`, picoiot provision
    # --api-token); a default here would replace them at the first config (an operator may still set them)
    "api": {"token_hashes": [], "rate_per_s": 5, "burst": 10},
    "log": {"level": "info"},
}

_RELAY = {
    "type": "object",
    "required": ["pin"],
    "properties": {
        # permissive on purpose: GPIO 23-25 (the Pico W's Wi-Fi chip) and duplicate pins are the firmware's to refuse
        # (iotlib.relays.validate), and the integration tests rely on that path staying reachable
        "pin": {"type": "integer", "minimum": 0, "maximum": 28},
        "active_low": {"type": "boolean"},
        "power_on": {"enum": ["off", "on", "restore"]},
        "interlock": {"type": "string", "minLength": 1, "maxLength": 32},
        "max_on_s": {"type": "number", "minimum": 0, "maximum": 86400000},
        "pulse_ms": {"type": "number", "minimum": 0, "maximum": 86400000},
        "failsafe": {"enum": ["keep", "off", "on"]},
    },
}

RELAYS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "relays device config",
    "type": "object",
    "required": ["relays"],
    "properties": {
        **_COMMON_PROPS,
        "relays": {"type": "object", "maxProperties": 16,
                   # `cause` and `rejected` are keys of the reported state beside the relays (iotlib.relays)
                   "propertyNames": {"pattern": "^[A-Za-z0-9_-]{1,32}$", "not": {"enum": ["cause", "rejected"]}},
                   "additionalProperties": _RELAY},
        "failsafe_after_s": {"type": "number", "minimum": 0, "maximum": 86400},
    },
}

RELAYS_DEFAULTS: dict[str, Any] = {
    **copy.deepcopy(_COMMON_DEFAULTS),
    # the seed's example wiring (relay1 on GPIO2, relay2 on GPIO3), which is also the firmware's default: a device built
    # with other relay_pins refuses a config that would move its relays (it reports why); a board's other wiring goes
    # into a group or device override; to drop a default relay, override it with null. failsafe "keep", the
    # firmware's: a relay holds its state while the control plane is away unless the operator names one for it
    "relays": {
        "relay1": {"pin": 2, "active_low": False, "power_on": "off", "max_on_s": 0, "failsafe": "keep"},
        "relay2": {"pin": 3, "active_low": False, "power_on": "off", "max_on_s": 0, "failsafe": "keep"},
    },
    "failsafe_after_s": 0,
}

SENSORS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sensors device config",
    "type": "object",
    "required": ["sampling"],
    "properties": {
        **_COMMON_PROPS,
        "sampling": {"type": "object", "required": ["interval_ms"], "properties": {
            "interval_ms": {"type": "integer", "minimum": 10, "maximum": 3600000},
            "fields": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 32},
                       "maxItems": 16, "uniqueItems": True},
            "sources": {"type": "object"},
        }},
        "i2c": {"type": "object"},
        "filters": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "kind": {"enum": ["none", "ema", "median", "deadband"]},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "window": {"type": "integer", "minimum": 1, "maximum": 32},
            "threshold": {"type": "number", "minimum": 0},
            "chain": {"type": "array", "maxItems": 8},
        }}},
        "ws": {"type": "object", "properties": {
            "max_clients": {"type": "integer", "minimum": 1, "maximum": 4},
            "max_rate_hz": {"type": "number", "minimum": 0.01, "maximum": 50},
        }},
    },
}

SENSORS_DEFAULTS: dict[str, Any] = {
    **copy.deepcopy(_COMMON_DEFAULTS),
    "sampling": {"interval_ms": 1000, "fields": ["temperature", "humidity", "pressure", "cpu_temp"], "sources": {}},
    "filters": {},
    "ws": {"max_clients": 3, "max_rate_hz": 10},
    "i2c": {},
}

BUILTIN: dict[str, tuple[dict, dict]] = {
    "relays": (RELAYS_SCHEMA, RELAYS_DEFAULTS),
    "sensors": (SENSORS_SCHEMA, SENSORS_DEFAULTS),
}


def check_schema(schema: dict) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise Invalid("invalid JSON schema", {"path": _path(e.absolute_path), "message": e.message}) from None


def _path(parts) -> str:
    return ".".join(str(p) for p in parts)


_validators: dict[str, Any] = {}


def _validator(schema: dict):
    """Validators by schema content: building one is far dearer than using it, and there are only a few schemas."""
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    v = _validators.get(key)
    if v is None:
        if len(_validators) > 256:
            _validators.clear()
        v = _validators[key] = jsonschema.Draft202012Validator(schema)
    return v


def config_errors(schema: dict, config: Any) -> list[dict[str, str]]:
    """Every schema violation as {path, message}, sorted by path (stable, so the first one is reproducible)."""
    validator = _validator(schema)
    out = []
    for e in validator.iter_errors(config):
        path = _path(e.absolute_path)
        if e.validator == "required" and isinstance(e.validator_value, list):
            missing = [p for p in e.validator_value if isinstance(e.instance, dict) and p not in e.instance]
            if missing:
                path = f"{path}.{missing[0]}" if path else missing[0]
        out.append({"path": path, "message": e.message})
    out.sort(key=lambda x: x["path"])
    return out


def validate_config(schema: dict, config: Any, device_id: str | None = None) -> None:
    errors = config_errors(schema, config)
    if errors:
        first = errors[0]
        detail: dict[str, Any] = {"path": first["path"], "message": first["message"], "errors": errors[:10]}
        if device_id is not None:
            detail["device_id"] = device_id
        raise Invalid(f"invalid config: {first['path'] or '(root)'}: {first['message']}", detail)
