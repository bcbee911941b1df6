"""Two `picoiot server` processes on one PostgreSQL behave as one: a change written through B wakes a long-poll that is
waiting on A (LISTEN/NOTIFY), for config, state and heartbeat waits.

How a missed wake-up fails these tests without timing anything: each long-poll waits far longer than the client is
willing to (config and state: wait=300 s against a 60 s client timeout), or — for the heartbeat, whose wait the server
caps at half the TTL — A answers from its in-memory version cache, which only a NOTIFY from B can update, so a
timed-out wait would carry the stale version and fail the assertion.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from cptest import PG_URL, drop_schema, require_pg
from support.servers import ServerProcess

pytestmark = pytest.mark.postgres

CLIENT_TIMEOUT = 60.0  # far below the 300 s waits: a long-poll that is not woken fails the test
STARTUP_S = 60.0


class ServerProc(ServerProcess):
    """`picoiot server` as a real subprocess on one PostgreSQL schema, started at once."""

    def __init__(self, data_dir: Path, schema: str, secrets_from: Path | None = None):
        super().__init__(data_dir, db=PG_URL, db_schema=schema, fast=False, secrets_from=secrets_from,
                         log=data_dir.parent / f"{data_dir.name}.log", client_timeout=CLIENT_TIMEOUT)
        self.start(STARTUP_S)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Servers A and B: one schema, one set of secrets (copied from A's data dir before B starts). Shared by the
    module's tests, which each use a device of their own."""
    require_pg()
    schema = f"mp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    started: list[ServerProc] = []
    where = tmp_path_factory.mktemp("pair")
    try:
        a = ServerProc(where / "a", schema)
        started.append(a)
        b = ServerProc(where / "b", schema, secrets_from=where / "a")
        started.append(b)
        yield a, b
    finally:
        for s in started:
            s.close()
        drop_schema(schema)


def secrets_of(server: ServerProc) -> dict:
    return json.loads((server.data_dir / "secrets.json").read_text())


def operator_token(server: ServerProc, role: str = "admin") -> dict:
    from picoiot.server.auth import issue_token
    token = issue_token(secrets_of(server)["signing_key"], "test", "default", role, 600)
    return {"Authorization": f"Bearer {token}"}


def register(server: ServerProc, device_id: str) -> dict:
    """Challenge–response registration (protocol §2) with the derived key; returns the auth header."""
    enrollment = secrets_of(server)["enrollment_keys"]["default"]
    key = hmac.new(enrollment.encode(), device_id.encode(), hashlib.sha256).hexdigest()
    r = server.client.post("/api/devices/challenge", json={"device_id": device_id})
    assert r.status_code == 200, r.text
    nonce = r.json()["nonce"]
    sig = hmac.new(key.encode(), f"{nonce}|{device_id}".encode(), hashlib.sha256).hexdigest()
    r = server.client.post("/api/devices/register", json={"device_id": device_id, "nonce": nonce, "signature": sig,
                                                         "device_type": "relays", "firmware": "0.1.0"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def wait_for_waiter(server: ServerProc, kind: str, future: concurrent.futures.Future) -> None:
    """Synchronisation aid: return once `server` reports a long-poll of `kind` waiting (not a timing assertion)."""
    deadline = time.monotonic() + 30
    while server.metric("picoiot_longpolls_waiting", f'kind="{kind}"') < 1:
        if future.done():
            raise AssertionError(f"the long-poll answered before any change: {future.result().text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} long-poll ever waited on the server")
        time.sleep(0.02)


def test_both_processes_are_ready_on_one_schema(pair):
    a, b = pair
    for s in (a, b):
        r = s.client.get("/ready")
        assert r.status_code == 200 and r.json()["ready"] is True


def test_config_change_through_b_wakes_config_long_poll_on_a(pair):
    a, b = pair
    dev = register(a, "mp-config-1")
    r = a.client.get("/api/v1/devices/mp-config-1/config", headers=dev)
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        poll = pool.submit(a.client.get, "/api/v1/devices/mp-config-1/config",
                           params={"version": v, "wait": 300}, headers=dev)
        wait_for_waiter(a, "config", poll)
        r = b.client.patch("/api/v1/namespaces/default/devices/mp-config-1/config",
                           json={"overrides": {"log": {"level": "debug"}}}, headers=operator_token(b))
        assert r.status_code == 200, r.text
        answer = poll.result(CLIENT_TIMEOUT + 5)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == v + 1
    assert answer.json()["config"]["log"]["level"] == "debug"
    assert answer.headers["etag"] == f'"{v + 1}"'


def test_desired_state_through_b_wakes_shadow_long_poll_on_a(pair):
    a, b = pair
    dev = register(a, "mp-state-1")
    path = "/api/v1/namespaces/default/devices/mp-state-1/shadows/default"
    r = a.client.post(path, json={"state": {"reported": {"relay1": "off"}}}, headers=dev)
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        poll = pool.submit(a.client.get, path, params={"version": v, "wait": 300}, headers=dev)
        wait_for_waiter(a, "state", poll)
        r = b.client.post(path, json={"state": {"desired": {"relay1": "on"}}}, headers=operator_token(b, "operator"))
        assert r.status_code == 200, r.text
        answer = poll.result(CLIENT_TIMEOUT + 5)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["version"] == v + 1
    assert doc["state"]["desired"] == {"relay1": "on"}
    assert doc["state"]["delta"] == {"relay1": "on"}


def test_config_change_through_b_wakes_heartbeat_wait_on_a_with_the_new_version(pair):
    a, b = pair
    dev = register(a, "mp-hb-1")
    hb = {"seq": 1, "uptime": 5, "mem_free": 80000, "rssi": -60}
    first = a.client.post("/api/v1/devices/mp-hb-1/heartbeat", json=hb, headers=dev)
    assert first.status_code == 200, first.text
    pending = first.json()["pending"]
    body = {**hb, "seq": 2, "config_version": pending["config_version"], "state_version": pending["state_version"]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        poll = pool.submit(a.client.post, "/api/v1/devices/mp-hb-1/heartbeat", params={"wait": 60}, json=body,
                           headers=dev)
        wait_for_waiter(a, "heartbeat", poll)
        r = b.client.patch("/api/v1/namespaces/default/devices/mp-hb-1/config",
                           json={"overrides": {"log": {"level": "warning"}}}, headers=operator_token(b))
        assert r.status_code == 200, r.text
        answer = poll.result(CLIENT_TIMEOUT + 5)
    assert answer.status_code == 200, answer.text
    # A's version cache learns of B's write only through NOTIFY: a stale number here means the wake-up was missed.
    assert answer.json()["ack"] == 2
    assert answer.json()["pending"]["config_version"] == pending["config_version"] + 1
    assert answer.json()["pending"]["state_version"] == pending["state_version"]


def test_a_device_deleted_through_b_is_gone_on_a(pair):
    a, b = pair
    dev = register(a, "mp-del-1")
    assert a.client.post("/api/v1/devices/mp-del-1/heartbeat", json={"seq": 1}, headers=dev).status_code == 200
    r = b.client.delete("/api/v1/namespaces/default/devices/mp-del-1", headers=operator_token(b))
    assert r.status_code == 200, r.text
    # A dropped its cached versions on B's "deleted" event, so the next heartbeat is refused, not answered from cache.
    deadline = time.monotonic() + 30
    while True:
        r = a.client.post("/api/v1/devices/mp-del-1/heartbeat", json={"seq": 2}, headers=dev)
        if r.status_code == 404 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "unknown device"


def test_an_ota_assignment_through_b_wakes_heartbeat_wait_on_a_with_the_offer(pair, tmp_path):
    from picoiot import ota_cli
    a, b = pair
    dev = register(a, "mp-ota-1")
    hb = {"seq": 1, "uptime": 5}
    # A answers this one from its "no assignment in this namespace" cache, which B's assignment must then clear
    first = a.client.post("/api/v1/devices/mp-ota-1/heartbeat", json=hb, headers=dev)
    assert first.status_code == 200 and first.json()["pending"]["ota"] is None, first.text
    pending = first.json()["pending"]
    tok = operator_token(b)["Authorization"].removeprefix("Bearer ")
    pub = ota_cli.keygen(tmp_path / "ota.key")
    ota_cli.set_key(b.url, tok, "default", pub)
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "main.py").write_text("print('2.0')\n")
    ota_cli.publish(b.url, tok, "default", rel, "2.0", tmp_path / "ota.key")
    body = {**hb, "seq": 2, "config_version": pending["config_version"], "state_version": pending["state_version"]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        poll = pool.submit(a.client.post, "/api/v1/devices/mp-ota-1/heartbeat", params={"wait": 60, "ota": ""},
                           json=body, headers=dev)
        wait_for_waiter(a, "heartbeat", poll)
        ota_cli.assign(b.url, tok, "default", "2.0", "mp-ota-1", None)
        answer = poll.result(CLIENT_TIMEOUT + 5)
    assert answer.status_code == 200, answer.text
    assert answer.json()["pending"]["ota"] == "2.0"
