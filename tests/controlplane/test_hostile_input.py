"""Hostile input on both databases: text no UTF-8 encoder accepts never enters storage, a bug answers JSON, and
unauthenticated registration challenges are limited per client address (issue 17)."""
from picoiot.server.db import now_ms
from picoiot.server.app import create_app
from cptest import LiveServer

SURROGATE = '"\\ud800"'  # valid JSON, not encodable as UTF-8
SH = "/api/v1/namespaces/default/devices/relay-1/shadows/default"
CFG = "/api/v1/namespaces/default/devices/relay-1/config"


def _post_raw(server, method, path, headers, body):
    return server.client.request(method, path, headers={**headers, "content-type": "application/json"},
                                 content=body.encode())


def _refused(r, field):
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str)
    assert field in str(body.get("detail")), (field, body)


def test_lone_surrogates_are_refused_with_the_field_and_nothing_is_stored(server):
    d = server.register("relay-1")
    op, admin = server.auth("operator"), server.auth("admin")
    before = server.client.get(SH, headers=d.headers).json()
    cases = [
        ("POST", SH, op, '{"state":{"desired":{"relay2":%s}}}' % SURROGATE, "state.desired.relay2"),
        ("POST", SH, op, '{"state":{"desired":{"nested":{"list":[1,%s]}}}}' % SURROGATE,
         "state.desired.nested.list.1"),
        ("POST", SH, d.headers, '{"state":{"reported":{"relay1":%s}}}' % SURROGATE, "state.reported.relay1"),
        ("PUT", CFG, admin, '{"overrides":{"name":%s}}' % SURROGATE, "overrides.name"),
        ("PATCH", CFG, admin, '{"overrides":{"name":%s}}' % SURROGATE, "overrides.name"),
        ("PUT", "/api/v1/namespaces/default/groups/g1", admin, '{"overrides":{"name":%s}}' % SURROGATE,
         "overrides.name"),
        ("POST", d.services["alarms"], d.headers, '{"alarms":[{"key":"k","message":%s}]}' % SURROGATE, "message"),
        ("POST", "/api/v1/namespaces/default/devices", admin, '{"device_id":%s}' % SURROGATE, "device_id"),
        ("PATCH", "/api/v1/namespaces/default/devices/relay-1", admin, '{"group":%s}' % SURROGATE, "group"),
    ]
    for method, path, headers, body, field in cases:
        _refused(_post_raw(server, method, path, headers, body), field)
    # the heartbeat's own fast path, and telemetry on it and on its own route
    for path, body in ((d.services["heartbeat"], '{"seq":1,"firmware":%s}' % SURROGATE),
                       (d.services["heartbeat"], '{"seq":1,"t":[[%s,%d,1.5]]}' % (SURROGATE, now_ms())),
                       ("/api/v1/devices/relay-1/telemetry", '{"readings":[[%s,%d,1.5]]}' % (SURROGATE, now_ms()))):
        r = _post_raw(server, "POST", path, d.headers, body)
        assert 400 <= r.status_code < 500 and isinstance(r.json().get("error"), str), (path, body, r.text)
    # nothing was written, and every read still works — the device's own state fetch first
    r = server.client.get(SH, headers=d.headers)
    assert r.status_code == 200 and r.json() == before
    for path in (CFG, "/api/v1/namespaces/default/groups", "/api/v1/namespaces/default/alarms",
                 "/api/v1/namespaces/default/devices"):
        r = server.client.get(path, headers=admin)
        assert r.status_code == 200, (path, r.text)
    assert r.json()["devices"][0]["device_id"] == "relay-1" and len(r.json()["devices"]) == 1
    assert server.client.get("/api/v1/namespaces/default/groups", headers=admin).json() == {"groups": []}
    assert server.client.get(CFG, headers=admin).json()["overrides"] == {}
    assert server.client.get("/api/v1/namespaces/default/alarms", headers=admin).json()["alarms"] == []
    r = server.client.get("/api/v1/namespaces/default/devices/relay-1/telemetry/latest", headers=admin)
    assert r.status_code == 200 and r.json() == {"values": {}}, r.text


def test_a_bug_answers_a_json_500(server_factory):
    app = create_app(server_factory(  # borrow the factory's settings for a second app on the same database
    ).settings)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    s = LiveServer(app.state.cp.settings, app=app)
    try:
        r = s.client.get("/boom")
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "internal server error"
    finally:
        s.stop()


def test_registration_challenges_are_limited_per_address(server_factory):
    server = server_factory(challenges_per_address_burst=5, challenges_per_address_per_s=0.01)
    codes = [server.client.post("/api/devices/challenge", json={"device_id": f"d{i}"}) for i in range(8)]
    assert [r.status_code for r in codes] == [200] * 5 + [429] * 3
    r = codes[-1]
    assert r.json()["error"].startswith("too many registration challenges") and int(r.headers["retry-after"]) >= 1
    assert ["nonce" in r.json() for r in codes] == [True] * 5 + [False] * 3  # a refused challenge issues none


def test_a_flood_of_challenges_is_throttled_with_the_defaults(server):
    codes = [server.client.post("/api/devices/challenge", json={"device_id": f"flood-{i}"}).status_code
             for i in range(300)]
    assert set(codes) == {200, 429} and codes[0] == 200


def test_the_openapi_document_describes_the_answers_the_server_gives(server):
    doc = server.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    op = doc["paths"]["/api/v1/namespaces/{ns}/devices/{device_id}/shadows/{name}"]["post"]
    assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "403" in doc["paths"]["/api/devices/refresh"]["post"]["responses"]
    desired = doc["components"]["schemas"]["ShadowStateIn"]["properties"]["desired"]
    assert {"$ref": "#/components/schemas/JsonObject"} in desired["anyOf"]
    # a 405 names every method of the path, not only the first route's
    r = server.client.request("OPTIONS", "/api/v1/namespaces/default/devices/x/config", headers=server.auth())
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "PUT", "PATCH"}
    # a namespace-wide token on a device endpoint: 403 (documented), not 400
    r = server.client.get("/api/v1/devices/x/config", headers=server.auth("admin", "*"))
    assert r.status_code == 403
