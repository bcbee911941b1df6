"""Alarms: batch ingestion, dedup, idempotent retries, episodes, ack, filters (protocol §6)."""

AL = "/api/v1/namespaces/{ns}/alarms"


def _post(server, d, *alarms):
    return server.client.post(d.services["alarms"], headers=d.headers, json={"alarms": list(alarms)})


def _list(server, ns="default", role="viewer", **params):
    r = server.client.get(AL.format(ns=ns), headers=server.auth(role, ns), params=params)
    assert r.status_code == 200, r.text
    return r.json()["alarms"]


def _a(key="sensor.bme280", count=1, first=1000, last=1000, state="firing", severity="warning", msg="I2C failed"):
    return {"key": key, "severity": severity, "message": msg, "count": count, "first_ts": first, "last_ts": last,
            "state": state}


def test_batch_is_stored_and_listed(server):
    d = server.register("sens-1", device_type="sensors")
    r = _post(server, d, _a(), _a("wifi.weak", severity="info", msg="rssi -85"))
    assert r.status_code == 200 and r.json() == {"accepted": 2}
    alarms = _list(server)
    assert {a["key"] for a in alarms} == {"sensor.bme280", "wifi.weak"}
    a = next(a for a in alarms if a["key"] == "sensor.bme280")
    assert a["device_id"] == "sens-1" and a["namespace"] == "default" and a["state"] == "firing"
    assert a["count"] == 1 and a["first_ts"] == 1000 and a["last_ts"] == 1000 and a["acked"] is False


def test_retried_batch_is_idempotent_and_counts_follow_the_device(server):
    d = server.register("sens-1", device_type="sensors")
    batch = [_a(count=3, first=1000, last=3000)]
    for _ in range(3):  # the device retries after lost answers
        assert _post(server, d, *batch).status_code == 200
    [a] = _list(server)
    assert a["count"] == 3 and a["first_ts"] == 1000 and a["last_ts"] == 3000
    _post(server, d, _a(count=5, first=1000, last=5000))
    [a] = _list(server)
    assert a["count"] == 5 and a["last_ts"] == 5000
    # an older batch arriving late changes nothing
    _post(server, d, _a(count=2, first=1000, last=2000))
    [a] = _list(server)
    assert a["count"] == 5 and a["last_ts"] == 5000


def test_resolve_then_fire_again_is_a_new_episode_and_counts_add_up(server):
    d = server.register("sens-1", device_type="sensors")
    _post(server, d, _a(count=4, first=1000, last=4000))
    _post(server, d, _a(count=4, first=1000, last=4500, state="resolved"))
    [a] = _list(server)
    assert a["state"] == "resolved" and a["count"] == 4
    # a retry of the old firing batch does not re-open it
    _post(server, d, _a(count=4, first=1000, last=4000))
    assert _list(server)[0]["state"] == "resolved"
    # the device fires again later: second episode, its own running count
    _post(server, d, _a(count=2, first=6000, last=7000))
    _post(server, d, _a(count=2, first=6000, last=7000))  # and retries it
    [a] = _list(server)
    assert a["state"] == "firing" and a["count"] == 6 and a["episodes"] == 2
    assert a["first_ts"] == 1000 and a["last_ts"] == 7000


def test_fire_and_resolve_in_one_batch(server):
    d = server.register("sens-1", device_type="sensors")
    _post(server, d, _a(count=1, last=1000), _a(count=1, last=2000, state="resolved"))
    [a] = _list(server)
    assert a["state"] == "resolved" and a["count"] == 1


def test_ack_and_rearm_on_a_new_episode(server):
    d = server.register("sens-1", device_type="sensors")
    _post(server, d, _a(count=1, last=1000))
    [a] = _list(server)
    url = AL.format(ns="default") + f"/{a['id']}/ack"
    assert server.client.post(url, headers=server.auth("viewer")).status_code == 403
    r = server.client.post(url, headers=server.auth("operator"))
    assert r.status_code == 200 and r.json()["acked"] is True and r.json()["acked_by"] == "tester"
    assert server.client.post(url, headers=server.auth("operator")).json()["acked"] is True  # idempotent
    assert _list(server, acked="false") == [] and len(_list(server, acked="true")) == 1
    # still firing: the same episode stays acknowledged; a new episode re-arms it
    _post(server, d, _a(count=2, last=2000))
    assert _list(server)[0]["acked"] is True
    _post(server, d, _a(count=2, last=3000, state="resolved"))
    _post(server, d, _a(count=1, first=4000, last=4000))
    assert _list(server)[0]["acked"] is False


def test_filters(server):
    d1 = server.register("sens-1", device_type="sensors")
    d2 = server.register("relay-1")
    _post(server, d1, _a("a", severity="critical"), _a("b", state="resolved"))
    _post(server, d2, _a("a", severity="info"))
    assert len(_list(server)) == 3
    assert [a["device_id"] for a in _list(server, device="relay-1")] == ["relay-1"]
    assert {(a["device_id"], a["key"]) for a in _list(server, state="firing")} == {("sens-1", "a"), ("relay-1", "a")}
    assert [a["severity"] for a in _list(server, severity="critical")] == ["critical"]
    assert len(_list(server, key="a")) == 2
    assert len(_list(server, limit=1)) == 1
    r = server.client.get(AL.format(ns="default"), headers=server.auth("viewer"), params={"state": "burning"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "state"


def test_bad_alarm_batches(server):
    d = server.register("sens-1", device_type="sensors")
    r = _post(server, d, {**_a(), "severity": "apocalyptic"})
    assert r.status_code == 422 and r.json()["detail"]["path"].endswith("severity")
    r = _post(server, d, {**_a(), "count": 0})
    assert r.status_code == 422
    r = _post(server, d, *[_a(f"k{i}") for i in range(101)])
    assert r.status_code == 422 and r.json()["detail"]["path"] == "alarms"
    r = server.client.post(d.services["alarms"], headers={**d.headers, "content-type": "application/json"},
                           content=b'{"alarms": [}')
    assert r.status_code == 400
    assert _list(server) == []  # nothing of a refused batch is stored
    # operators do not post device alarms
    r = server.client.post(d.services["alarms"], headers=server.auth("admin"), json={"alarms": [_a()]})
    assert r.status_code == 403


def test_namespaces_do_not_see_each_others_alarms(server):
    d = server.register("sens-1", device_type="sensors")
    _post(server, d, _a())
    assert _list(server, ns="other") == []
    r = server.client.get(AL.format(ns="default"), headers=server.auth("admin", "other"))
    assert r.status_code == 404
    aid = _list(server)[0]["id"]
    r = server.client.post(AL.format(ns="other") + f"/{aid}/ack", headers=server.auth("admin", "other"))
    assert r.status_code == 404 and r.json()["error"] == "unknown alarm"
    r = server.client.get(AL.format(ns="nope"), headers=server.auth("admin", "*"))
    assert r.status_code == 404 and r.json()["error"] == "unknown namespace"


def test_only_the_device_itself_reports_its_alarms_as_on_the_other_device_routes(server):
    # the one decision of auth.own_device_ns: an operator is 403, another device's path 404 (no existence leak), and
    # a device token of every namespace 403 (the device routes name no namespace: it would have to guess one)
    server.register("sens-1", device_type="sensors")
    server.register("sens-2", device_type="sensors")
    tokens = {"operator": server.token("admin"), "another device": server.token("device", sub="sens-2"),
              "a device of every namespace": server.token("device", ns="*", sub="sens-1")}
    bodies = {"alarms": {"alarms": [_a()]}, "heartbeat": {"seq": 1},
              "telemetry": {"readings": [["temp", 1000, 21.5]]}}
    for who, token in tokens.items():
        answers = {route: server.client.post(f"/api/v1/devices/sens-1/{route}", json=body,
                                             headers={"Authorization": f"Bearer {token}"})
                   for route, body in bodies.items()}
        statuses = {route: r.status_code for route, r in answers.items()}
        assert statuses == dict.fromkeys(bodies, 404 if who == "another device" else 403), who
        errors = {r.json()["error"].replace("report alarms", "…").replace("send heartbeats", "…")
                  .replace("send telemetry", "…") for r in answers.values()}
        assert len(errors) == 1, (who, errors)
    assert _list(server) == []
