"""ConfigurationServer: layering, versions, schema validation, ETag, blocking queries, reports (protocol §3)."""
import threading

import sqlalchemy as sa

from picoiot.server import db as tables
from picoiot.server.devicetypes import RELAYS_DEFAULTS, SENSORS_DEFAULTS


def _cfg(server, d, **params):
    return server.client.get(d.services["config"], headers=d.headers, params=params)


def _patch(server, dev, overrides, role="admin"):
    return server.client.patch(f"/api/v1/namespaces/default/devices/{dev}/config", headers=server.auth(role),
                               json={"overrides": overrides})


def test_registration_gives_version_1_with_the_type_defaults(server):
    d = server.register("relay-1")
    r = _cfg(server, d)
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    assert r.json() == {"version": 1, "config": RELAYS_DEFAULTS}
    s = server.register("sens-1", device_type="sensors")
    assert _cfg(server, s).json()["config"] == SENSORS_DEFAULTS


def test_if_none_match_gives_304(server):
    d = server.register("relay-1")
    r = server.client.get(d.services["config"], headers={**d.headers, "If-None-Match": '"1"'})
    assert r.status_code == 304 and r.headers["etag"] == '"1"' and r.content == b""
    r = server.client.get(d.services["config"], headers={**d.headers, "If-None-Match": '"0"'})
    assert r.status_code == 200


def test_layering_group_then_device_overrides_and_null_removes(server):
    d = server.register("relay-1")
    a = server.auth("admin")
    r = server.client.put("/api/v1/namespaces/default/groups/garage", headers=a,
                          json={"overrides": {"log": {"level": "debug"}, "failsafe_after_s": 30}})
    assert r.status_code == 200
    r = server.client.patch("/api/v1/namespaces/default/devices/relay-1", headers=a, json={"group": "garage"})
    assert r.status_code == 200 and r.json()["group"] == "garage" and r.json()["config_version"] == 2
    assert _patch(server, "relay-1", {"failsafe_after_s": 5, "relays": {"relay2": None}}).status_code == 200
    body = _cfg(server, d).json()
    assert body["version"] == 3
    cfg = body["config"]
    assert cfg["log"]["level"] == "debug"          # from the group
    assert cfg["failsafe_after_s"] == 5            # the device beats the group
    assert "relay2" not in cfg["relays"] and cfg["relays"]["relay1"]["pin"] == 2  # null removed, rest kept
    # the group changes: members get a new version
    server.client.put("/api/v1/namespaces/default/groups/garage", headers=a, json={"overrides": {}})
    body = _cfg(server, d).json()
    assert body["version"] == 4 and body["config"]["log"]["level"] == "info"


def test_invalid_override_is_refused_with_the_path_and_not_stored(server):
    d = server.register("sens-1", device_type="sensors")
    r = _patch(server, "sens-1", {"sampling": {"interval_ms": 5}})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"]["path"] == "sampling.interval_ms" and "sampling.interval_ms" in body["error"]
    r = _patch(server, "sens-1", {"sampling": {"interval_ms": "fast"}})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "sampling.interval_ms"
    r = _patch(server, "sens-1", {"sampling": None})  # a required section removed
    assert r.status_code == 422 and r.json()["detail"]["path"] == "sampling"
    # nothing stored: still version 1, defaults, no overrides kept
    assert _cfg(server, d).json() == {"version": 1, "config": SENSORS_DEFAULTS}
    view = server.client.get("/api/v1/namespaces/default/devices/sens-1/config", headers=server.auth()).json()
    assert view["overrides"] == {} and view["version"] == 1
    rows = server.sql(lambda c: c.execute(sa.select(sa.func.count()).select_from(tables.device_configs)).scalar())
    assert rows == 1


def test_invalid_group_is_refused_for_all_members(server):
    server.register("sens-1", device_type="sensors")
    a = server.auth()
    server.client.put("/api/v1/namespaces/default/groups/lab", headers=a, json={"overrides": {}})
    server.client.patch("/api/v1/namespaces/default/devices/sens-1", headers=a, json={"group": "lab"})
    r = server.client.put("/api/v1/namespaces/default/groups/lab", headers=a,
                          json={"overrides": {"ws": {"max_clients": 99}}})
    assert r.status_code == 422
    assert r.json()["detail"] == {**r.json()["detail"], "path": "ws.max_clients", "device_id": "sens-1"}
    groups = server.client.get("/api/v1/namespaces/default/groups", headers=a).json()["groups"]
    assert groups[0]["overrides"] == {}  # the bad group content was not kept


def test_same_effective_config_makes_no_new_version(server):
    server.register("relay-1")
    assert _patch(server, "relay-1", {"log": {"level": "info"}}).json()["version"] == 1  # equals the default
    assert _patch(server, "relay-1", {"log": {"level": "error"}}).json()["version"] == 2


def test_blocking_query_returns_at_once_when_the_version_differs(server):
    d = server.register("relay-1")
    r = _cfg(server, d, version=0, wait=60)
    assert r.status_code == 200 and r.json()["version"] == 1


def test_blocking_query_wakes_on_change(server):
    d = server.register("relay-1")
    result = {}

    def poll():
        result["r"] = _cfg(server, d, version=1, wait=60)

    t = threading.Thread(target=poll)
    t.start()
    _wait_longpolls(server, "config", 1)
    assert _patch(server, "relay-1", {"failsafe_after_s": 9}).status_code == 200
    t.join(20)
    r = result["r"]
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["config"]["failsafe_after_s"] == 9


def test_blocking_query_times_out_with_304_and_wait_is_capped(server_factory):
    s = server_factory(max_config_wait_s=0)
    d = s.register("relay-1")
    # a 1-hour wait ends at the server's cap (here 0): if the cap were ignored this would hit the client timeout
    r = s.client.get(d.services["config"], headers=d.headers, params={"version": 1, "wait": 3600})
    assert r.status_code == 304 and r.headers["etag"] == '"1"'


def test_bad_query_values_are_422(server):
    d = server.register("relay-1")
    for params in ({"version": -1}, {"wait": "soon"}, {"version": "x"}):
        r = _cfg(server, d, **params)
        assert r.status_code == 422 and "error" in r.json(), params


def test_device_reports_applied_and_rejected(server):
    d = server.register("relay-1")
    url = d.services["config"] + "/report"
    assert server.client.post(url, headers=d.headers, json={"version": 1, "status": "applied"}).json() == {"ok": True}
    r = server.client.post(url, headers=d.headers, json={"version": 1, "status": "rejected",
                                                          "reason": "relays.relay1.pin: in use"})
    assert r.status_code == 200
    view = server.client.get("/api/v1/namespaces/default/devices/relay-1/config", headers=server.auth("viewer"))
    rep = view.json()["report"]
    assert rep["status"] == "rejected" and rep["reason"] == "relays.relay1.pin: in use" and rep["version"] == 1
    bad = server.client.post(url, headers=d.headers, json={"version": 1, "status": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"]["path"] == "status"
    # operators do not report on behalf of devices
    assert server.client.post(url, headers=server.auth(), json={"version": 1, "status": "applied"}).status_code == 403


def test_a_device_cannot_read_another_devices_config(server):
    d1 = server.register("relay-1")
    server.register("relay-2")
    r = server.client.get("/api/v1/devices/relay-2/config", headers=d1.headers)
    assert r.status_code == 404


def test_config_writes_need_admin(server):
    server.register("relay-1")
    assert _patch(server, "relay-1", {"log": {"level": "debug"}}, role="operator").status_code == 403
    assert _patch(server, "relay-1", {"log": {"level": "debug"}}, role="viewer").status_code == 403


def test_device_types_global_admin_only_and_validated(server):
    t = server.client.get("/api/v1/device-types", headers=server.auth("viewer")).json()["device_types"]
    assert {x["name"] for x in t} == {"relays", "sensors"}
    body = {"json_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}, "defaults": {"x": 1}}
    assert server.client.put("/api/v1/device-types/meter", headers=server.auth("admin"), json=body).status_code == 403
    star = server.auth("admin", ns="*")
    r = server.client.put("/api/v1/device-types/meter", headers=star, json=body)
    assert r.status_code == 200 and r.json()["version"] == 1
    bad_defaults = {**body, "defaults": {"x": "one"}}
    r = server.client.put("/api/v1/device-types/meter", headers=star, json=bad_defaults)
    assert r.status_code == 422 and r.json()["detail"]["path"] == "x"
    bad_schema = {"json_schema": {"type": "no-such-type"}, "defaults": {}}
    r = server.client.put("/api/v1/device-types/meter", headers=star, json=bad_schema)
    assert r.status_code == 422 and r.json()["error"] == "invalid JSON schema"
    # a type change that would break a registered device's config is refused, and nothing of it is stored
    server.register("m-1", device_type="meter")
    assert _patch(server, "m-1", {"z": 1}).status_code == 200
    strict = {"json_schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                              "additionalProperties": False}, "defaults": {"x": 2}}
    r = server.client.put("/api/v1/device-types/meter", headers=star, json=strict)
    assert r.status_code == 422 and r.json()["detail"]["device_id"] == "m-1"
    r = server.client.get("/api/v1/device-types/meter", headers=server.auth("viewer"))
    assert r.json()["version"] == 1 and r.json()["defaults"] == {"x": 1}


def _wait_longpolls(server, kind, n):
    from cptest import wait_until
    wait_until(lambda: server.cp.metrics.longpolls.labels(kind)._value.get() >= n)


def test_relay_schema_refuses_what_no_firmware_accepts(server):
    server.register("relay-1")
    for bad, path in (({"relays": {"relay1": {"pin": 29}}}, "relays.relay1.pin"),
                      ({"relays": {"relay1": {"failsafe": "explode"}}}, "relays.relay1.failsafe"),
                      ({"relays": {"relay1": {"pulse_ms": -1}}}, "relays.relay1.pulse_ms"),
                      ({"relays": {"bad name": {"pin": 4}}}, "relays")):
        r = _patch(server, "relay-1", bad)
        assert r.status_code == 422 and r.json()["detail"]["path"] == path, (bad, r.json())
    r = _patch(server, "relay-1", {"relays": {"relay2": None, "pump": {"pin": 5, "pulse_ms": 500,
                                                                        "interlock": "valves"}}})
    assert r.status_code == 200 and set(r.json()["config"]["relays"]) == {"relay1", "pump"}


def test_the_config_diff_lists_the_leaves_changed_since_the_previous_version(server):
    server.register("relay-1")
    url = "/api/v1/namespaces/default/devices/relay-1/config/diff"
    r = server.client.get(url, headers=server.auth("viewer"))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.json()["previous_version"] is None
    assert _patch(server, "relay-1", {"failsafe_after_s": 7, "relays": {"relay2": None}}).status_code == 200
    body = server.client.get(url, headers=server.auth("viewer")).json()
    assert body["version"] == 2 and body["previous_version"] == 1 and isinstance(body["created_ts"], int)
    changed = {d["path"]: (d["before"], d["after"]) for d in body["diff"]}
    assert changed.pop("failsafe_after_s")[1] == 7
    assert changed == {"relays.relay2": (RELAYS_DEFAULTS["relays"]["relay2"], None)}, body["diff"]
    # another namespace's operator sees nothing of it
    r = server.client.get(url, headers=server.auth("viewer", ns="other"))
    assert r.status_code in (403, 404) and r.json()["error"], r.text
