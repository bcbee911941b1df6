"""StateServer: AWS-shadow semantics, versions, limits, namespace isolation, blocking wait (protocol §4)."""
import threading

from cptest import wait_until

SH = "/api/v1/namespaces/{ns}/devices/{dev}/shadows/{name}"


def _url(dev="relay-1", ns="default", name="default"):
    return SH.format(ns=ns, dev=dev, name=name)


def test_new_shadow_reads_empty_at_version_0(server):
    d = server.register("relay-1")
    r = server.client.get(d.services["state"], headers=d.headers)
    assert r.status_code == 200
    assert r.json() == {"state": {"desired": {}, "reported": {}, "delta": {}},
                        "metadata": {"desired": {}, "reported": {}}, "version": 0, "timestamp": 0}


def test_desired_reported_delta_metadata_and_null_deletes(server):
    # the document semantics, on a device of no type (a relays device's desired keys are checked: see below)
    d = server.register("relay-1", device_type=None)
    op = server.auth("operator")
    r = server.client.post(_url(), headers=op, json={"state": {"desired": {"relay1": "on", "relay2": "off",
                                                                           "cfg": {"a": 1, "b": 2}}}})
    assert r.status_code == 200
    doc = r.json()
    assert doc["version"] == 1 and doc["state"]["delta"] == {"relay1": "on", "relay2": "off", "cfg": {"a": 1, "b": 2}}
    assert doc["metadata"]["desired"]["relay1"]["timestamp"] == doc["timestamp"]
    assert doc["metadata"]["desired"]["cfg"]["a"]["timestamp"] == doc["timestamp"]
    r = server.client.post(d.services["state"], headers=d.headers,
                           json={"state": {"reported": {"relay1": "on", "relay2": "on", "cfg": {"a": 1}}}})
    doc = r.json()
    assert doc["version"] == 2
    assert doc["state"]["delta"] == {"relay2": "off", "cfg": {"b": 2}}  # only what still differs
    assert doc["state"]["reported"] == {"relay1": "on", "relay2": "on", "cfg": {"a": 1}}
    # null deletes a field (and its metadata)
    doc = server.client.post(_url(), headers=op, json={"state": {"desired": {"relay2": None}}}).json()
    assert "relay2" not in doc["state"]["desired"] and "relay2" not in doc["metadata"]["desired"]
    assert doc["state"]["delta"] == {"cfg": {"b": 2}} and doc["version"] == 3
    # the device may clear desired fields it has applied
    doc = server.client.post(d.services["state"], headers=d.headers,
                             json={"state": {"desired": {"cfg": None}}}).json()
    assert doc["state"]["desired"] == {"relay1": "on"} and doc["state"]["delta"] == {}
    assert server.client.get(d.services["state"], headers=d.headers).json() == doc


def test_stale_version_gets_409_with_the_current_version(server):
    d = server.register("relay-1")
    r = server.client.post(d.services["state"], headers=d.headers,
                           json={"state": {"reported": {"x": 1}}, "version": 0})
    assert r.status_code == 200 and r.json()["version"] == 1
    r = server.client.post(d.services["state"], headers=d.headers,
                           json={"state": {"reported": {"x": 2}}, "version": 0})
    assert r.status_code == 409 and r.json() == {"error": "version conflict", "version": 1}
    assert server.client.get(d.services["state"], headers=d.headers).json()["state"]["reported"] == {"x": 1}


def test_concurrent_versioned_writers_exactly_one_wins(server):
    d = server.register("relay-1")
    results = []

    def write(i):
        r = server.client.post(d.services["state"], headers=d.headers,
                               json={"state": {"reported": {"w": i}}, "version": 0})
        results.append(r.status_code)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * 7
    assert server.client.get(d.services["state"], headers=d.headers).json()["version"] == 1


def test_unversioned_concurrent_updates_all_land(server):
    d = server.register("relay-1")

    def write(i):
        r = server.client.post(d.services["state"], headers=d.headers, json={"state": {"reported": {f"k{i}": i}}})
        assert r.status_code == 200

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = server.client.get(d.services["state"], headers=d.headers).json()
    assert doc["version"] == 8 and len(doc["state"]["reported"]) == 8


def test_too_large_document_is_413_and_nothing_changes(server):
    d = server.register("relay-1")
    server.client.post(d.services["state"], headers=d.headers, json={"state": {"reported": {"ok": 1}}})
    big = {"blob": "x" * (9 * 1024)}
    r = server.client.post(d.services["state"], headers=d.headers, json={"state": {"reported": big}})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    # several small writes that together pass the limit are refused at the one that crosses it
    for i in range(3):
        r = server.client.post(d.services["state"], headers=d.headers,
                               json={"state": {"reported": {f"part{i}": "y" * 3000}}})
    assert r.status_code == 413
    doc = server.client.get(d.services["state"], headers=d.headers).json()
    assert set(doc["state"]["reported"]) == {"ok", "part0", "part1"} and doc["version"] == 3


def test_too_deep_document_is_400(server):
    d = server.register("relay-1")
    deep = {"v": 1}
    for i in range(6):  # 7 levels
        deep = {f"l{i}": deep}
    r = server.client.post(d.services["state"], headers=d.headers, json={"state": {"reported": deep}})
    assert r.status_code == 400 and "too deep" in r.json()["error"] and r.json()["detail"]["max_depth"] == 6
    ok = deep["l5"]  # 6 levels
    assert server.client.post(d.services["state"], headers=d.headers,
                              json={"state": {"reported": ok}}).status_code == 200


def test_pathologically_nested_json_is_400_not_500(server):
    d = server.register("relay-1")
    body = '{"state": {"reported": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}}"
    r = server.client.post(d.services["state"], headers={**d.headers, "content-type": "application/json"},
                           content=body)
    assert r.status_code == 400 and "error" in r.json()


def test_malformed_updates(server):
    d = server.register("relay-1")
    c, h = server.client, {**d.headers, "content-type": "application/json"}
    assert c.post(d.services["state"], headers=h, content=b"{nope").status_code == 400
    r = c.post(d.services["state"], headers=d.headers, json={"state": {}})
    assert r.status_code == 400 and "nothing to update" in r.json()["error"]
    r = c.post(d.services["state"], headers=d.headers, json={"state": {"reported": [1, 2]}})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "state.reported"
    r = c.post(d.services["state"], headers=d.headers, json={"state": {"reported": {}}, "version": -1})
    assert r.status_code == 422
    r = c.post(d.services["state"], headers=d.headers, json={"state": {"reported": {"a": 1}}, "extra": 1})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "extra"


def test_roles_on_shadows(server):
    d = server.register("relay-1")
    c = server.client
    assert c.get(_url(), headers=server.auth("viewer")).status_code == 200
    assert c.post(_url(), headers=server.auth("viewer"),
                  json={"state": {"desired": {"relay1": "on"}}}).status_code == 403
    r = c.post(_url(), headers=server.auth("operator"), json={"state": {"reported": {"relay1": "on"}}})
    assert r.status_code == 403 and "desired" in r.json()["error"]
    r = c.post(d.services["state"], headers=d.headers, json={"state": {"desired": {"relay1": "on"}}})
    assert r.status_code == 403
    assert c.post(_url(), headers=server.auth("admin"), json={"state": {"reported": {"x": 1}}}).status_code == 200


def test_namespaces_isolate_completely(server):
    d = server.register("relay-1", ns="default", device_type=None)
    other_dev = server.register("relay-1", ns="other", device_type=None)  # same id, other tenant: another device
    c = server.client
    # an operator of "other" sees its own relay-1, never default's
    r = c.post(_url(ns="other"), headers=server.auth("operator", "other"), json={"state": {"desired": {"a": 1}}})
    assert r.status_code == 200
    assert c.get(d.services["state"], headers=d.headers).json()["version"] == 0
    for method, kw in (("GET", {}), ("POST", {"json": {"state": {"desired": {"a": 2}}}})):
        r = c.request(method, _url(ns="default"), headers=server.auth("admin", "other"), **kw)
        assert r.status_code == 404, method
    # a device token of namespace "other" cannot reach default's device of the same name
    r = c.get(_url(ns="default"), headers=other_dev.headers)
    assert r.status_code == 404
    r = c.post(_url(ns="default"), headers=other_dev.headers, json={"state": {"reported": {"x": 1}}})
    assert r.status_code == 404
    # nor another device's shadow in its own namespace
    server.register("relay-2")
    assert c.get(_url(dev="relay-2"), headers=d.headers).status_code == 404
    # a global admin sees both
    assert c.get(_url(ns="other"), headers=server.auth("admin", "*")).json()["version"] == 1


def test_unknown_namespace_and_device_are_404(server):
    c = server.client
    r = c.get(_url(ns="nope"), headers=server.auth("admin", "*"))
    assert r.status_code == 404 and r.json()["error"] == "unknown namespace"
    r = c.get(_url(dev="ghost"), headers=server.auth("admin"))
    assert r.status_code == 404 and r.json()["error"] == "unknown device"
    r = c.post(_url(dev="ghost"), headers=server.auth("admin"), json={"state": {"desired": {"a": 1}}})
    assert r.status_code == 404


def test_a_desired_value_a_relay_cannot_take_is_refused_naming_the_key(server):
    server.register("relay-1")  # the relays type's default config: relay1, relay2
    op = server.auth("operator")
    c = server.client
    for desired, path, says in (({"pump9": "on"}, "state.desired.pump9", "unknown relay"),
                                ({"relay1": "on", "relay2": 1}, "state.desired.relay2", '"on", "off"'),
                                ({"relay1": {"state": "on"}}, "state.desired.relay1", '"on", "off"'),
                                ({"relay1": "ON"}, "state.desired.relay1", '"on", "off"'),
                                ({"cause": {"relay1": "local"}}, "state.desired.cause", "unknown relay")):
        r = c.post(_url(), headers=op, json={"state": {"desired": desired}})
        assert r.status_code == 422, (desired, r.text)
        body = r.json()
        assert body["detail"]["path"] == path and says in body["error"] and path in body["error"], body
    # every bad key is named, and a refused write changes nothing
    r = c.post(_url(), headers=op, json={"state": {"desired": {"relay1": 2, "x": "on", "relay2": "off"}}})
    assert r.status_code == 422
    assert [e["path"] for e in r.json()["detail"]["errors"]] == ["state.desired.relay1", "state.desired.x"]
    assert c.get(_url(), headers=op).json()["version"] == 0
    # what a relay takes is accepted; clearing any key is too (a relay removed since, a rejected value)
    for desired in ({"relay1": "on", "relay2": "off"}, {"relay1": True, "relay2": False}, {"pump9": None}):
        r = c.post(_url(), headers=op, json={"state": {"desired": desired}})
        assert r.status_code == 200, (desired, r.text)
    # the relays are the device's own config's: a relay added by a config override is accepted from then on
    admin = server.auth("admin")
    r = c.patch("/api/v1/namespaces/default/devices/relay-1/config", headers=admin,
                json={"overrides": {"relays": {"pump9": {"pin": 9}}}})
    assert r.status_code == 200, r.text
    assert c.post(_url(), headers=op, json={"state": {"desired": {"pump9": "on"}}}).status_code == 200
    # other named shadows and devices of no type are not the relays' and are not checked
    assert c.post(_url(name="schedule"), headers=op, json={"state": {"desired": {"at": "07:00"}}}).status_code == 200
    server.register("thing-1", device_type=None)
    assert c.post(_url(dev="thing-1"), headers=op, json={"state": {"desired": {"x": 1}}}).status_code == 200


def test_named_shadows_are_separate(server):
    d = server.register("relay-1")
    op = server.auth("operator")
    server.client.post(_url(name="schedule"), headers=op, json={"state": {"desired": {"at": "07:00"}}})
    assert server.client.get(d.services["state"], headers=d.headers).json()["version"] == 0
    r = server.client.get("/api/v1/namespaces/default/devices/relay-1/shadows", headers=server.auth("viewer"))
    assert r.json() == {"shadows": ["schedule"]}
    assert server.client.get(_url(name="bad name!"), headers=op).status_code == 422


def test_blocking_wait_wakes_on_desired_change(server):
    d = server.register("relay-1")
    out = {}

    def poll():
        out["r"] = server.client.get(d.services["state"], headers=d.headers, params={"version": 0, "wait": 60})

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: server.cp.metrics.longpolls.labels("state")._value.get() >= 1)
    server.client.post(_url(), headers=server.auth("operator"), json={"state": {"desired": {"relay1": "on"}}})
    t.join(20)
    doc = out["r"].json()
    assert out["r"].status_code == 200 and doc["version"] == 1 and doc["state"]["delta"] == {"relay1": "on"}
    assert server.cp.metrics.longpolls.labels("state")._value.get() == 0


def test_blocking_wait_returns_at_once_if_behind(server):
    d = server.register("relay-1")
    server.client.post(_url(), headers=server.auth("operator"), json={"state": {"desired": {"relay1": "on"}}})
    r = server.client.get(d.services["state"], headers=d.headers, params={"version": 0, "wait": 3600})
    assert r.json()["version"] == 1


def test_values_the_database_cannot_hold_are_refused_cleanly(server):
    d = server.register("relay-1")
    h = {**d.headers, "content-type": "application/json"}
    for body in ('{"state": {"reported": {"name": "a\\u0000b"}}}', '{"state": {"reported": {"a\\u0000": 1}}}',
                 '{"state": {"reported": {"x": NaN}}}', '{"state": {"reported": {"x": Infinity}}}'):
        r = server.client.post(d.services["state"], headers=h, content=body)
        assert r.status_code == 422 and "not storable" in r.json()["detail"]["message"], body
    r = server.client.post(d.services["alarms"], headers=d.headers, json={"alarms": [{"key": "k\x00"}]})
    assert r.status_code == 422
    r = server.client.post(d.services["alarms"], headers=d.headers, json={"alarms": [{"key": "k", "count": 2**40}]})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "alarms.0.count"
    r = server.client.post("/api/v1/namespaces/default/alarms/999999999999999/ack", headers=server.auth("operator"))
    assert r.status_code == 422
    # a NUL smuggled through the path reaches the database layer and still gets a clean 4xx
    r = server.client.get("/api/v1/namespaces/default/devices/a%00b", headers=server.auth("viewer"))
    assert r.status_code == 422 and "NUL" in r.json()["detail"]["message"]
    assert server.client.get(d.services["state"], headers=d.headers).json()["version"] == 0
