"""Heartbeat: ack, pending versions, long-poll, TTL → offline + alarm, recovery (protocol §5)."""
import threading

from cptest import wait_until

from picoiot.server.models import HeartbeatOut


def _hb(server, d, params=None, **body):
    return server.client.post(d.services["heartbeat"], headers=d.headers, params=params or {},
                              json={"seq": 1, **body})


def _device(server, dev="relay-1"):
    return server.client.get(f"/api/v1/namespaces/default/devices/{dev}", headers=server.auth("viewer")).json()


def _alarms(server, **params):
    return server.client.get("/api/v1/namespaces/default/alarms", headers=server.auth("viewer"),
                             params=params).json()["alarms"]


def test_heartbeat_acks_and_reports_pending_versions(server):
    d = server.register("relay-1")
    r = _hb(server, d, seq=41, uptime=3600, mem_free=81234, rssi=-61, reconnects=1, firmware="0.1.0",
            config_version=1, state_version=0)
    assert r.status_code == 200
    body = r.json()
    HeartbeatOut.model_validate(body)  # the hand-built answer matches the documented model
    assert set(body) == set(HeartbeatOut.model_fields)
    assert body["ack"] == 41 and body["ttl"] == 35 and body["server_time"] > 0
    assert body["pending"] == {"config_version": 1, "state_version": 0, "ota": None}
    server.client.patch("/api/v1/namespaces/default/devices/relay-1/config", headers=server.auth(),
                        json={"overrides": {"failsafe_after_s": 3}})
    server.client.post("/api/v1/namespaces/default/devices/relay-1/shadows/default",
                       headers=server.auth("operator"), json={"state": {"desired": {"relay1": "on"}}})
    assert _hb(server, d, seq=42).json()["pending"] == {"config_version": 2, "state_version": 1, "ota": None}
    rec = _device(server)
    assert rec["heartbeat"]["seq"] == 42  # the latest heartbeat, flushed or still in memory


def test_long_poll_heartbeat_wakes_on_a_desired_change(server):
    d = server.register("relay-1")
    out = {}

    def poll():
        out["r"] = _hb(server, d, params={"wait": 15}, config_version=1, state_version=0)

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: server.cp.metrics.longpolls.labels("heartbeat")._value.get() >= 1)
    server.client.post("/api/v1/namespaces/default/devices/relay-1/shadows/default",
                       headers=server.auth("operator"), json={"state": {"desired": {"relay1": "on"}}})
    t.join(20)
    assert out["r"].json()["pending"]["state_version"] == 1


def test_long_poll_heartbeat_answers_at_once_when_something_is_pending(server):
    d = server.register("relay-1")
    # the device holds config 0 but the server has 1: no waiting, even for a long wait
    r = _hb(server, d, params={"wait": 3600}, config_version=0, state_version=0)
    assert r.json()["pending"]["config_version"] == 1


def test_long_poll_compares_with_the_versions_the_device_knows_of(server):
    # a device told of config 1 that it refused (it still runs 0): with config_version=1 in the query the long-poll
    # waits for the next change instead of answering at once, again and again
    d = server.register("relay-1")
    out = {}

    def poll():
        out["r"] = _hb(server, d, params={"wait": 15, "config_version": 1, "state_version": 0},
                       config_version=0, state_version=0)

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: server.cp.metrics.longpolls.labels("heartbeat")._value.get() >= 1)
    assert t.is_alive(), out
    server.client.post("/api/v1/namespaces/default/devices/relay-1/shadows/default",
                       headers=server.auth("operator"), json={"state": {"desired": {"relay1": "on"}}})
    t.join(20)
    assert out["r"].json()["pending"] == {"config_version": 1, "state_version": 1, "ota": None}
    assert _device(server)["heartbeat"]["config_version"] == 0  # the body stays what the device runs
    r = _hb(server, d, params={"wait": 1, "config_version": -1})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "config_version"


def test_missed_ttl_goes_offline_with_an_alarm_and_the_next_heartbeat_resolves_it(server_factory):
    s = server_factory(ttl_missed=1, ttl_slack_s=0, sweep_interval_s=0.05)
    a = s.auth()
    s.client.put("/api/v1/namespaces/default/groups/fast", headers=a, json={"overrides": {"heartbeat_interval_s": 1}})
    s.client.post("/api/v1/namespaces/default/devices", headers=a,
                  json={"device_id": "relay-1", "device_type": "relays", "group": "fast"})
    d = s.register("relay-1")
    assert d.intervals["heartbeat"] == 1 and d.intervals["ttl"] == 1
    # no heartbeats: the sweeper marks it offline and fires device_offline
    wait_until(lambda: _device(s)["online"] is False)
    alarms = _alarms(s, key="device_offline")
    assert len(alarms) == 1 and alarms[0]["state"] == "firing" and alarms[0]["severity"] == "error"
    # the next heartbeat brings it back and resolves the alarm before it is answered
    assert _hb(s, d).status_code == 200
    assert _device(s)["online"] is True
    alarms = _alarms(s, key="device_offline")
    assert alarms[0]["state"] == "resolved" and alarms[0]["count"] == 1
    # a second outage is a second episode of the same alarm (deduplicated, count 2)
    wait_until(lambda: _device(s)["online"] is False)
    alarms = _alarms(s, key="device_offline")
    assert len(alarms) == 1 and alarms[0]["state"] == "firing" and alarms[0]["count"] == 2
    assert alarms[0]["episodes"] == 2
    m = s.client.get("/metrics").text
    assert "picoiot_device_offline_transitions_total 2.0" in m


def test_heartbeats_keep_a_device_online(server_factory):
    s = server_factory(ttl_missed=1, ttl_slack_s=1, sweep_interval_s=0.05, heartbeat_flush_s=0.05)
    a = s.auth()
    s.client.put("/api/v1/namespaces/default/groups/fast", headers=a, json={"overrides": {"heartbeat_interval_s": 1}})
    s.client.post("/api/v1/namespaces/default/devices", headers=a,
                  json={"device_id": "relay-1", "device_type": "relays", "group": "fast"})
    d = s.register("relay-1")
    assert d.intervals["ttl"] == 2
    start = s.cp.liveness._sweeps
    # one heartbeat per sweep for 60 sweeps (≥ 3 s at 0.05 s, longer than the 2 s TTL): last_seen goes to the
    # database only through the batched flush, and the device must never be called offline
    for i in range(60):
        assert _hb(s, d, seq=i).status_code == 200
        wait_until(lambda: s.cp.liveness._sweeps > start + i)
    assert _device(s)["online"] is True and _alarms(s, key="device_offline") == []
    assert s.cp.metrics.offline_transitions._value.get() == 0


def test_heartbeat_auth_and_input_errors(server):
    d = server.register("relay-1")
    server.register("relay-2")
    c = server.client
    assert c.post("/api/v1/devices/relay-2/heartbeat", headers=d.headers, json={"seq": 1}).status_code == 404
    assert c.post(d.services["heartbeat"], headers=server.auth("admin"), json={"seq": 1}).status_code == 403
    assert c.post(d.services["heartbeat"], json={"seq": 1}).status_code == 401
    r = c.post(d.services["heartbeat"], headers=d.headers, json={"seq": -1})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "seq"
    r = c.post(d.services["heartbeat"], headers={**d.headers, "content-type": "application/json"}, content=b"{")
    assert r.status_code == 400
    r = c.post(d.services["heartbeat"], headers=d.headers, params={"wait": -1}, json={"seq": 1})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "wait"


def test_deleted_device_heartbeat_is_404(server):
    d = server.register("relay-1")
    assert _hb(server, d).status_code == 200
    assert server.client.delete("/api/v1/namespaces/default/devices/relay-1", headers=server.auth()).status_code == 200
    r = _hb(server, d)
    assert r.status_code == 404 and r.json()["error"] == "unknown device"


def test_last_seen_moves_with_heartbeats_and_is_flushed(server_factory):
    s = server_factory(heartbeat_flush_s=0.05)
    d = s.register("relay-1")
    before = _device(s)["last_seen"]
    hb = {"seq": 7, "mem_free": 1234}
    _hb(s, d, **hb)
    from picoiot.server import db as tables
    import sqlalchemy as sa
    t = tables.devices

    def stored():
        return s.sql(lambda c: c.execute(sa.select(t.c.last_seen, t.c.heartbeat)).first())

    wait_until(lambda: (stored()[1] or {}).get("seq") == 7)
    assert stored()[0] >= before and stored()[1]["mem_free"] == 1234


def test_memory_errors_a_device_survived_are_stored_and_shown_with_its_status(server):
    d = server.register("relay-1")
    r = _hb(server, d, seq=5, mem_free=4000, mem_errors={"ws": 2, "config": 1})
    assert r.status_code == 200
    assert _device(server)["heartbeat"]["mem_errors"] == {"ws": 2, "config": 1}
    for bad in ({"Ws\u0000": 1}, {"ws": -1}, {f"w{'x' * i}": 1 for i in range(9)}):
        r = _hb(server, d, seq=6, mem_errors=bad)
        assert r.status_code == 422 and r.json()["detail"]["path"].startswith("mem_errors"), (bad, r.text)
