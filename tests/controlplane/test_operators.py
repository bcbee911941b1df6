"""Operators' API, roles, errors, OpenAPI, /health /ready /metrics, limits."""
import jwt
from prometheus_client.parser import text_string_to_metric_families

from picoiot.server.auth import derive_device_key, issue_token
from picoiot.server.db import LATEST

DEV = "/api/v1/namespaces/default/devices"


def test_missing_bad_and_expired_tokens_are_401_json(server):
    c = server.client
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Token abc"},
                    {"Authorization": "Bearer " + issue_token(server.settings.secrets.signing_key, "x", "default",
                                                              "admin", -5)}):
        r = c.get(DEV, headers=headers)
        assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        assert r.json()["error"] in ("missing bearer token", "invalid token", "token expired")
        assert r.headers["www-authenticate"] == "Bearer"
    bad_role = jwt.encode({"sub": "x", "ns": "default", "role": "root", "exp": 2**40},
                          server.settings.secrets.signing_key, algorithm="HS256")
    r = c.get(DEV, headers={"Authorization": f"Bearer {bad_role}"})
    assert r.status_code == 401 and r.json()["error"] == "invalid token claims"


def test_role_matrix(server):
    c = server.client
    server.register("relay-1")
    cases = [  # (method, path, body, least role that may)
        ("GET", DEV, None, "viewer"),
        ("GET", DEV + "/relay-1", None, "viewer"),
        ("GET", DEV + "/relay-1/config", None, "viewer"),
        ("GET", "/api/v1/namespaces/default/groups", None, "viewer"),
        ("POST", DEV + "/relay-1/shadows/default", {"state": {"desired": {"relay1": "on"}}}, "operator"),
        ("PUT", "/api/v1/namespaces/default/groups/g", {"overrides": {}}, "admin"),
        ("PATCH", DEV + "/relay-1/config", {"overrides": {}}, "admin"),
        ("PATCH", DEV + "/relay-1", {"group": None}, "admin"),
        ("POST", DEV, {"device_id": "new-1"}, "admin"),
    ]
    order = ["viewer", "operator", "admin"]
    for method, path, body, least in cases:
        for role in order:
            r = c.request(method, path, headers=server.auth(role), json=body)
            allowed = order.index(role) >= order.index(least)
            if allowed:
                assert r.status_code in (200, 201), (method, path, role, r.text)
            else:
                assert r.status_code == 403, (method, path, role, r.status_code)
                assert r.json()["error"].startswith("role ") or "desired" in r.json()["error"]
    # a device token is not an operator token
    d = server.register("relay-2")
    assert c.get(DEV, headers=d.headers).status_code == 403


def test_provision_register_delete(server):
    c, a = server.client, server.auth("admin")
    r = c.post(DEV, headers=a, json={"device_id": "relay-9", "device_type": "relays", "group": None})
    assert r.status_code == 201
    out = r.json()
    assert out["service_discovery_url"] == f"{server.url}/api/devices" and out["namespace"] == "default"
    assert out["device_key"] == derive_device_key(server.settings.secrets.enrollment_key("default"), "relay-9")
    assert c.post(DEV, headers=a, json={"device_id": "relay-9"}).status_code == 409
    rec = c.get(DEV + "/relay-9", headers=a).json()
    assert rec["online"] is False and rec["config_version"] == 1 and rec["first_seen"] is None
    d = server.register("relay-9", key=out["device_key"])
    assert c.get(DEV, headers=a, params={"online": "true"}).json()["devices"][0]["device_id"] == "relay-9"
    server.client.post(d.services["alarms"], headers=d.headers, json={"alarms": [{"key": "k"}]})
    assert c.delete(DEV + "/relay-9", headers=server.auth("operator")).status_code == 403
    assert c.delete(DEV + "/relay-9", headers=a).json() == {"ok": True}
    assert c.get(DEV + "/relay-9", headers=a).status_code == 404
    assert c.delete(DEV + "/relay-9", headers=a).status_code == 404
    assert c.get("/api/v1/namespaces/default/alarms", headers=a).json()["alarms"] == []
    assert c.get(d.services["config"], headers=d.headers).status_code == 404
    r = c.post(DEV, headers=a, json={"device_id": "x", "device_type": "toaster"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "device_type"
    r = c.post(DEV, headers=a, json={"device_id": "has space"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "device_id"


def test_device_list_filters(server):
    server.register("relay-1")
    server.register("sens-1", device_type="sensors")
    c, v = server.client, server.auth("viewer")
    assert [d["device_id"] for d in c.get(DEV, headers=v, params={"device_type": "sensors"}).json()["devices"]] \
        == ["sens-1"]
    assert c.get(DEV, headers=v, params={"online": "false"}).json()["devices"] == []
    assert len(c.get(DEV, headers=v, params={"limit": 1}).json()["devices"]) == 1
    assert c.get(DEV, headers=v, params={"limit": 0}).status_code == 422


def test_namespaces(server):
    c = server.client
    assert c.get("/api/v1/namespaces", headers=server.auth("viewer")).json() == {"namespaces": ["default"]}
    star = server.auth("admin", "*")
    assert set(c.get("/api/v1/namespaces", headers=star).json()["namespaces"]) == {"default", "other"}
    assert c.post("/api/v1/namespaces", headers=server.auth("admin"), json={"name": "lab"}).status_code == 403
    assert c.post("/api/v1/namespaces", headers=star, json={"name": "lab"}).status_code == 201
    assert c.post("/api/v1/namespaces", headers=star, json={"name": "lab"}).status_code == 409
    assert c.post("/api/v1/namespaces", headers=star, json={"name": "bad/name"}).status_code == 422
    # the new namespace works at once: devices register into it with keys derived from its own enrollment key
    d = server.register("relay-1", ns="lab")
    assert d.namespace == "lab"
    assert (server.settings.data_dir / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_device_endpoints_need_a_single_namespace_token(server):
    server.register("relay-1")
    r = server.client.get("/api/v1/devices/relay-1/config", headers=server.auth("admin", "*"))
    assert r.status_code == 403 and "namespace" in r.json()["error"]  # a token that cannot be used here
    assert server.client.get("/api/v1/devices/relay-1/config", headers=server.auth("viewer")).status_code == 200


def test_a_device_with_no_release_assigned_is_offered_none(server):
    d = server.register("relay-1")
    assert server.client.get(d.services["ota"], headers=d.headers).status_code == 204


def test_body_size_limit(server):
    d = server.register("relay-1")
    big = b'{"state": {"reported": {"x": "' + b"y" * (65 * 1024) + b'"}}}'
    r = server.client.post(d.services["state"], headers={**d.headers, "content-type": "application/json"},
                           content=big)
    assert r.status_code == 413 and r.json()["error"] == "request body too large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(70):
            yield b"x" * 1024
    r = server.client.post(d.services["state"], headers={**d.headers, "content-type": "application/json"},
                           content=chunks())
    assert r.status_code == 413


def test_unknown_route_and_method_are_json(server):
    r = server.client.get("/api/v1/nothing")
    assert r.status_code == 404 and r.json() == {"error": "not found"}
    r = server.client.delete("/health")
    assert r.status_code == 405 and r.json()["error"] == "method not allowed"


def test_openapi_models_every_operation(server):
    spec = server.client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/api/devices/challenge", "/api/devices/register", "/api/devices/refresh",
              "/api/v1/devices/{device_id}/config", "/api/v1/devices/{device_id}/config/report",
              "/api/v1/devices/{device_id}/heartbeat", "/api/v1/devices/{device_id}/alarms",
              "/api/v1/namespaces/{ns}/devices/{device_id}/shadows/{name}", "/api/v1/namespaces/{ns}/alarms",
              "/api/v1/namespaces/{ns}/alarms/{alarm_id}/ack", "/api/v1/device-types/{name}",
              "/api/v1/namespaces/{ns}/groups/{name}", "/health", "/ready", "/metrics"):
        assert p in paths, p
    for path, ops in paths.items():
        for method, op in ops.items():
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert ok, (method, path)
            for status in ok:
                content = op["responses"][status].get("content")
                if status != "204" and path != "/metrics":
                    assert content and "schema" in content["application/json"], (method, path, status)
            if path.startswith("/api/v1"):
                assert "401" in op["responses"], (method, path)


def test_health_ready_metrics(server):
    c = server.client
    assert c.get("/health").json() == {"status": "ok"}
    r = c.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["migrations"] == LATEST
    server.register("relay-1")
    from cptest import wait_until
    wait_until(lambda: server.cp.metrics.devices_online._value.get() == 1)
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert fams["picoiot_devices_online"].samples[0].value == 1
    assert "picoiot_alarms_firing" in fams and "picoiot_longpolls_waiting" in fams
    reqs = [s for s in fams["picoiot_http_requests"].samples
            if s.labels.get("route") == "/api/devices/register" and s.labels.get("status") == "200"]
    assert reqs and reqs[0].value == 1
    assert "picoiot_http_request_duration_seconds" in fams


def test_ready_is_503_when_the_database_is_gone(server_factory, tmp_path):
    import sqlalchemy as sa
    s = server_factory()
    s.database_broken_on_purpose = True
    s.cp.db.engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none"
                                      if server_factory.backend == "postgres"
                                      else f"sqlite:///{tmp_path}/missing/dir/x.db")
    r = s.client.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.json()["database"] is False
    assert s.client.get("/health").status_code == 200  # alive, just not ready


def test_services_mount_on_their_own(backend, tmp_path):
    """create_app(services=[…]): e.g. discovery alone on its own host, with the operations endpoints."""
    from cptest import LiveServer, drop_schema, make_settings, new_schema
    from picoiot.server import create_app

    schema = new_schema() if backend == "postgres" else None
    settings = make_settings(backend, tmp_path, schema)
    s = LiveServer(settings, app=create_app(settings, services=["discovery", "ops"]))
    try:
        assert s.client.get("/health").status_code == 200
        d = s.register("relay-1")
        assert s.client.get(d.services["config"], headers=d.headers).status_code == 404  # not mounted here
        assert set(s.client.get("/openapi.json").json()["paths"]) == {
            "/api/devices/challenge", "/api/devices/register", "/api/devices/refresh", "/health", "/ready",
            "/metrics"}
    finally:
        s.stop()
        if schema:
            drop_schema(schema)


def test_device_reads_overlay_the_heartbeat_this_process_holds_unflushed(server_factory):
    s = server_factory(heartbeat_flush_s=3600, sweep_interval_s=3600)  # no flush during the test
    d = s.register("relay-1")
    assert s.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 7, "uptime": 70}).status_code == 200
    assert s.sql(lambda c: c.exec_driver_sql("SELECT heartbeat FROM devices").scalar()) is None  # in memory only
    one = s.client.get(f"{DEV}/relay-1", headers=s.auth("viewer")).json()
    [listed] = s.client.get(DEV, headers=s.auth("viewer")).json()["devices"]
    for rec in (one, listed):
        assert rec["heartbeat"] == {"seq": 7, "uptime": 70} and rec["last_seen"] >= rec["registered_ts"]
