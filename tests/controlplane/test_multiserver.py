"""Two control-plane servers on one PostgreSQL behave as one: a write through one wakes long-polls waiting on the
other (LISTEN/NOTIFY), and their caches follow. (The two-*process* version lives with the operations tests.)"""
import threading

import pytest

from cptest import wait_until


@pytest.fixture
def pair(pg_server_factory):
    return pg_server_factory(), pg_server_factory()


@pytest.mark.postgres
def test_write_on_one_server_wakes_a_long_poll_on_the_other(pair):
    a, b = pair
    d = a.register("relay-1")
    out = {}

    def poll():  # the device's long-poll lands on server B
        out["r"] = b.client.get(d.services["state"].replace(a.url, b.url), headers=d.headers,
                                params={"version": 0, "wait": 60})

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: b.cp.metrics.longpolls.labels("state")._value.get() >= 1)
    r = a.client.post("/api/v1/namespaces/default/devices/relay-1/shadows/default", headers=a.auth("operator"),
                      json={"state": {"desired": {"relay1": "on"}}})
    assert r.status_code == 200
    t.join(20)
    assert out["r"].json()["state"]["delta"] == {"relay1": "on"}


@pytest.mark.postgres
def test_heartbeat_pending_follows_changes_made_on_the_other_server(pair):
    a, b = pair
    d = a.register("relay-1")
    hb = d.services["heartbeat"].replace(a.url, b.url)
    assert b.client.post(hb, headers=d.headers, json={"seq": 1}).json()["pending"]["config_version"] == 1
    a.client.patch("/api/v1/namespaces/default/devices/relay-1/config", headers=a.auth(),
                   json={"overrides": {"failsafe_after_s": 4}})
    # B's cached version is updated by the notification, not by a query: wait for it to arrive
    wait_until(lambda: b.client.post(hb, headers=d.headers, json={"seq": 2}).json()["pending"]["config_version"] == 2)
    # and a config long-poll on B wakes from a change on A
    out = {}

    def poll():
        out["r"] = b.client.get(d.services["config"].replace(a.url, b.url), headers=d.headers,
                                params={"version": 2, "wait": 60})

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: b.cp.metrics.longpolls.labels("config")._value.get() >= 1)
    a.client.patch("/api/v1/namespaces/default/devices/relay-1/config", headers=a.auth(),
                   json={"overrides": {"failsafe_after_s": 5}})
    t.join(20)
    assert out["r"].json()["version"] == 3


def test_only_one_server_raises_the_offline_alarm(server_factory):
    a = server_factory(ttl_missed=1, ttl_slack_s=0, sweep_interval_s=0.02)
    b = server_factory(ttl_missed=1, ttl_slack_s=0, sweep_interval_s=0.02)
    adm = a.auth()
    a.client.put("/api/v1/namespaces/default/groups/fast", headers=adm, json={"overrides": {"heartbeat_interval_s": 1}})
    for i in range(5):
        a.client.post("/api/v1/namespaces/default/devices", headers=adm,
                      json={"device_id": f"r{i}", "device_type": "relays", "group": "fast"})
        a.register(f"r{i}")
    wait_until(lambda: a.client.get("/api/v1/namespaces/default/devices", headers=adm,
                                    params={"online": "false"}).json()["devices"].__len__() == 5)
    alarms = b.client.get("/api/v1/namespaces/default/alarms", headers=b.auth()).json()["alarms"]
    assert len(alarms) == 5 and all(x["count"] == 1 for x in alarms)
    total = a.cp.metrics.offline_transitions._value.get() + b.cp.metrics.offline_transitions._value.get()
    assert total == 5


@pytest.mark.postgres
def test_a_lost_listen_connection_resyncs_caches_and_waiters(pair):
    a, b = pair
    d = a.register("relay-1")
    hb = d.services["heartbeat"].replace(a.url, b.url)
    assert b.client.post(hb, headers=d.headers, json={"seq": 1}).json()["pending"]["state_version"] == 0
    # what B sees after its LISTEN connection was down: a change it never heard about, then the resync
    import sqlalchemy as sa

    from picoiot.server import db as tables
    s = tables.shadows
    b.sql(lambda c: c.execute(s.insert().values(ns="default", device_id="relay-1", name="default", desired={"x": 1},
                                                reported={}, meta={}, version=5, updated_ts=1)))
    assert b.client.post(hb, headers=d.headers, json={"seq": 2}).json()["pending"]["state_version"] == 0  # stale
    # cut the servers' LISTEN connections (only this test's channel): they reconnect and resync
    channel = b.cp.notifier.channel
    killed = b.sql(lambda c: c.execute(sa.text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = :q"),
        {"q": f'LISTEN "{channel}"'}).scalar())
    assert killed >= 1
    wait_until(lambda: b.client.post(hb, headers=d.headers, json={"seq": 3}).json()["pending"]["state_version"] == 5)
