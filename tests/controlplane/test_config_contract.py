"""One config contract: the server's device types (server/devicetypes.py) agree with the firmware, which is the source.

The firmware states its config as a compact schema (iotlib/device.py's COMMON_SCHEMA plus each controller's
`schema()`), its defaults (`defaults()`), and, for the relays, the checks and per-field defaults of iotlib/relays.py.
The server's JSON Schema must name the same keys with the same types, enums and ranges, and its defaults must be the
values a device takes when the control plane says nothing — or a config the server accepts is refused by the device
(or the other way round), and a device's behaviour changes the moment it first registers.

Where the firmware checks a section in code rather than in its compact schema (`"type": "dict"`: relays, filters,
i2c, sampling.sources, api.tokens' items), the server may describe it in more depth; the relays are compared here
against iotlib.relays itself.
"""
from __future__ import annotations

import sys

import pytest

from picoiot import paths
from picoiot.server import devicetypes
from picoiot.server.refusals import Invalid

_FW = str(paths.REPO / "firmware")

#: compact schema type → JSON Schema type
_TYPES = {"int": "integer", "float": "number", "number": "number", "str": "string", "bool": "boolean",
          "list": "array", "dict": "object"}
#: compact `min`/`max` → the JSON Schema keywords they mean for that type
_RANGES = {"integer": ("minimum", "maximum"), "number": ("minimum", "maximum"), "string": ("minLength", "maxLength"),
           "array": ("minItems", "maxItems")}


@pytest.fixture(scope="module")
def firmware():
    """The controllers as a device builds them (CPython runs the firmware unchanged, as the firmware suite does)."""
    added = _FW not in sys.path
    if added:
        sys.path.insert(0, _FW)
    try:
        from relays_controller import RelaysController
        from sensors_controller import SensorsController
        from iotlib import relays
        args = ("lab", "", "contract-1", "-", "http://127.0.0.1")
        yield {"relays": RelaysController(*args), "sensors": SensorsController(*args), "relays_module": relays}
    finally:
        if added:
            sys.path.remove(_FW)


def _server_type(js: dict) -> str | None:
    if "type" in js:
        return js["type"]
    enum = js.get("enum")
    if enum and all(isinstance(v, str) for v in enum):
        return "string"
    return None


def disagreements(fw: dict, js: dict, path: str = "") -> list[str]:
    """Where the firmware's compact schema `fw` and the server's JSON Schema `js` differ, one line each."""
    out: list[str] = []
    where = path or "(root)"
    if not isinstance(fw.get("type"), str):  # a section: {field: spec}
        if _server_type(js) != "object" and path:
            return [f"{where}: a section on the device, {_server_type(js)} on the server"]
        props = js.get("properties", {})
        for k in sorted(set(fw) - set(props) - {"*"}):
            out.append(f"{path + '.' if path else ''}{k}: on the device only")
        for k in sorted(set(props) - set(fw)):
            out.append(f"{path + '.' if path else ''}{k}: on the server only")
        for k in sorted(set(fw) & set(props)):
            out += disagreements(fw[k], props[k], f"{path}.{k}" if path else k)
        return out
    t = _TYPES[fw["type"]]
    if _server_type(js) != t:
        return [f"{where}: {t} on the device, {_server_type(js)} on the server"]
    if fw.get("enum") is not None or js.get("enum") is not None:
        if sorted(fw.get("enum") or []) != sorted(js.get("enum") or []):
            out.append(f"{where}: enum {fw.get('enum')} on the device, {js.get('enum')} on the server")
    lo, hi = _RANGES.get(t, (None, None))
    for compact, keyword in (("min", lo), ("max", hi)):
        if keyword is None:
            continue
        if fw.get(compact) != js.get(keyword):
            out.append(f"{where}: {compact} {fw.get(compact)} on the device, {keyword} {js.get(keyword)} on the server")
    for keyword in ("exclusiveMinimum", "exclusiveMaximum"):  # the compact schema has inclusive bounds only
        if keyword in js:
            out.append(f"{where}: {keyword} on the server (the device's bounds are inclusive)")
    if t == "array" and "items" in fw:
        out += disagreements(fw["items"], js.get("items", {}), f"{where}[]")
    return out


def _relay_values(relays_module, name: str, cfg: dict) -> dict:
    """A relay's settings as the device runs them: what it was given, and relays.py's defaults for the rest."""
    r = relays_module._Relay(name, cfg)
    return {"pin": r.pin_no, "active_low": r.active_low, "power_on": r.power_on, "interlock": r.group,
            "max_on_s": r.max_on_ms / 1000, "pulse_ms": r.pulse_ms, "failsafe": r.failsafe}


@pytest.mark.parametrize("kind", sorted(devicetypes.BUILTIN))
def test_the_servers_schema_names_the_firmwares_keys_types_enums_and_ranges(firmware, kind):
    schema, _ = devicetypes.BUILTIN[kind]
    assert disagreements(firmware[kind].schema(), schema) == []


@pytest.mark.parametrize("kind", sorted(devicetypes.BUILTIN))
def test_the_servers_defaults_are_what_a_device_runs_when_told_nothing(firmware, kind):
    device = firmware[kind]
    _, defaults = devicetypes.BUILTIN[kind]
    fw = device.defaults()
    if kind == "relays":
        # the device's relays come from its wiring (relay_pins; relay1/relay2 on GPIO 2/3 when built without it), not
        # from defaults(): compared as the device runs them, field defaults included
        rel = firmware["relays_module"]
        fw = dict(fw)
        assert fw.pop("relays") == {}
        served = defaults["relays"]
        assert {n: _relay_values(rel, n, c) for n, c in served.items()} == \
            {n: _relay_values(rel, n, c) for n, c in device.builtin_relays().items()}
        defaults = {k: v for k, v in defaults.items() if k != "relays"}
    # the board's own static tokens come from its settings file (iotlib/settings.py, `api_tokens`): a server default
    # would replace them at the first config, so the server names the key in its schema only
    fw_api = dict(fw["api"])  # defaults() copies shallowly: the firmware's own dicts must stay untouched
    assert fw_api.pop(BOARD_ONLY[1]) == [] and BOARD_ONLY[1] not in defaults["api"]
    fw = {**fw, "api": fw_api}
    assert BOARD_ONLY[1] in devicetypes.BUILTIN[kind][0]["properties"]["api"]["properties"]
    assert defaults == fw


#: a key whose value a board brings from its settings file, not from the control plane's defaults
BOARD_ONLY = ("api", "tokens")


def test_the_servers_relay_schema_is_iotlib_relays(firmware):
    rel = firmware["relays_module"]
    relays = devicetypes.RELAYS_SCHEMA["properties"]["relays"]
    one = relays["additionalProperties"]["properties"]
    assert relays["maxProperties"] == rel.RelayBank.max_relays
    assert one["pin"]["minimum"] == 0 and one["pin"]["maximum"] == rel._MAX_PIN
    assert sorted(one["power_on"]["enum"]) == sorted(rel.POWER_ON)
    assert sorted(one["failsafe"]["enum"]) == sorted(rel.FAILSAFE)
    valid = {"pin": 2, "active_low": True, "power_on": "on", "interlock": "g", "max_on_s": 5, "pulse_ms": 100,
             "failsafe": "off"}
    assert sorted(valid) == sorted(one)  # every field the server knows, and no other
    assert rel.validate({"r": valid}) == []
    assert rel.validate({"r": dict(valid, colour="red")}) == ["relays.r.colour: unknown field"]
    for key in ("max_on_s", "pulse_ms"):
        assert one[key]["minimum"] == 0 and rel.validate({"r": {"pin": 2, key: one[key]["maximum"]}}) == []
        assert rel.validate({"r": {"pin": 2, key: one[key]["maximum"] + 1}})


@pytest.mark.parametrize("name", ["relay1", "a-b_C9", "x" * 32, "x" * 33, "", "bad name", "cause", "rejected"])
def test_a_relay_name_the_server_accepts_is_one_the_device_accepts(firmware, name):
    rel = firmware["relays_module"]
    cfg = dict(devicetypes.RELAYS_DEFAULTS, relays={name: {"pin": 2}})
    try:
        devicetypes.validate_config(devicetypes.RELAYS_SCHEMA, cfg)
        server_ok = True
    except Invalid:
        server_ok = False
    assert server_ok == (rel.validate({name: {"pin": 2}}) == [])


def test_the_contract_check_finds_what_differs():
    fw = {"a": {"type": "int", "min": 1, "max": 5}, "s": {"x": {"type": "str", "enum": ["p", "q"]}},
          "l": {"type": "list", "items": {"type": "str", "min": 1}, "max": 4}, "only_fw": {"type": "bool"}}
    js = {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 1, "maximum": 6}, "s": {"type": "object", "properties": {
            "x": {"enum": ["p"]}}}, "l": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "only_server": {"type": "number", "exclusiveMinimum": 0}}}
    assert disagreements(fw, js) == [
        "only_fw: on the device only",
        "only_server: on the server only",
        "a: max 5 on the device, maximum 6 on the server",
        "l[]: min 1 on the device, minLength None on the server",
        "s.x: enum ['p', 'q'] on the device, ['p'] on the server",
    ]
