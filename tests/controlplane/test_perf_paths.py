"""The heartbeat path's performance features, shown by behaviour (no timing): a warm version cache (no database read
for a registered device's first heartbeat, after registration or a restart), admission control (503 + Retry-After
beyond the limits, long-polls counted apart so they cannot starve heartbeats), a bounded database queue, and
`picoiot server --workers N` (PostgreSQL: any worker's change wakes a long-poll held by any other; SQLite refused).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cptest import PG_URL, drop_schema, make_settings, metric, require_pg, sign, wait_until
from picoiot.server.auth import derive_device_key, issue_token
from picoiot.server.db import Database, DatabaseBusy


def misses(srv) -> float:
    return metric(srv.client, "picoiot_version_cache_misses_total")


def beat(client: httpx.Client, dev_id: str, headers: dict, seq: int = 1, **q) -> httpx.Response:
    return client.post(f"/api/v1/devices/{dev_id}/heartbeat", json={"seq": seq, "uptime": 1}, headers=headers,
                       params=q or None)


# ------------------------------------------------------------------------------------------------ warm version cache
def test_first_heartbeat_after_registration_reads_no_row(server):
    devs = [server.register(f"warm-{i}") for i in range(3)]
    for d in devs:
        r = beat(server.client, d.device_id, d.headers)
        assert r.status_code == 200, r.text
        assert r.json()["ttl"] == d.intervals["ttl"]
    assert misses(server) == 0


def test_first_heartbeat_after_restart_reads_no_row_and_answers_current_versions(server_factory):
    a = server_factory()
    dev = a.register("warm-restart")
    r = a.client.post("/api/v1/namespaces/default/devices/warm-restart/shadows/default",
                     json={"state": {"desired": {"relay1": True}}}, headers=a.auth())
    assert r.status_code == 200, r.text
    state_version = r.json()["version"]
    r = a.client.patch("/api/v1/namespaces/default/devices/warm-restart/config",
                       json={"overrides": {"log": {"level": "debug"}}}, headers=a.auth())
    assert r.status_code == 200, r.text
    config_version = r.json()["version"]
    a.stop()
    b = server_factory()  # same database: a restart
    assert len(b.cp.versions) == 1  # filled at start-up
    r = beat(b.client, "warm-restart", dev.headers)
    assert r.status_code == 200, r.text
    assert r.json()["pending"]["config_version"] == config_version
    assert r.json()["pending"]["state_version"] == state_version
    assert misses(b) == 0


def test_registration_and_refresh_put_the_token_in_the_token_cache(server):
    dev = server.register("tok-1")
    before = metric(server.client, "picoiot_token_verifications")
    assert beat(server.client, "tok-1", dev.headers).status_code == 200
    assert metric(server.client, "picoiot_token_verifications") == before  # no JWT check for the first heartbeat
    r = server.client.post("/api/devices/refresh", headers=dev.headers)
    assert r.status_code == 200, r.text
    fresh = {"Authorization": f"Bearer {r.json()['token']}"}
    before = metric(server.client, "picoiot_token_verifications")
    assert beat(server.client, "tok-1", fresh, seq=2).status_code == 200
    assert metric(server.client, "picoiot_token_verifications") == before
    # a token the server did not just issue is still verified, once (and a forged one refused)
    minted = {"Authorization": f"Bearer {server.token('device', sub='tok-1')}"}
    assert beat(server.client, "tok-1", minted, seq=3).status_code == 200
    assert beat(server.client, "tok-1", minted, seq=4).status_code == 200
    assert metric(server.client, "picoiot_token_verifications") == before + 1
    forged = {"Authorization": f"Bearer {dev.token[:-2]}xx"}
    assert beat(server.client, "tok-1", forged, seq=5).status_code == 401


def test_device_unknown_to_the_cache_is_read_once_and_counted(server):
    # provisioned through the operators' API but never registered: not in the cache (no registration event)
    r = server.client.post("/api/v1/namespaces/default/devices", json={"device_id": "cold-1", "device_type": "relays"},
                           headers=server.auth())
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {server.token('device', sub='cold-1')}"}
    for seq in (1, 2):
        r = beat(server.client, "cold-1", headers, seq=seq)
        assert r.status_code == 200, r.text
    assert misses(server) == 1
    r = beat(server.client, "nobody", {"Authorization": f"Bearer {server.token('device', sub='nobody')}"})
    assert r.status_code == 404 and r.json()["error"] == "unknown device"


def test_registration_on_one_server_warms_the_others_cache(pg_server_factory):
    a, b = pg_server_factory(), pg_server_factory()
    dev = a.register("warm-pg")
    wait_until(lambda: b.cp.versions.get("default", "warm-pg") is not None)  # the NOTIFY carried the versions
    assert ("default", "warm-pg") in b.cp.liveness._online  # and the online flag: no write on B's first heartbeat
    r = beat(b.client, "warm-pg", dev.headers)
    assert r.status_code == 200, r.text
    assert misses(b) == 0


# ------------------------------------------------------------------------------------------------ admission control
def _hold_request(url: str, path: str, token: str) -> tuple[socket.socket, bytes]:
    """A request whose body is never finished: the server has admitted it and waits for the rest."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    body = json.dumps({"seq": 9, "uptime": 1}).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:3])
    return s, body[3:]


def _finish(held: tuple[socket.socket, bytes]) -> int:
    s, rest = held
    s.sendall(rest)
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1])


def _busy(r: httpx.Response, limit: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"] == "server busy, retry later" and r.json()["detail"]["limit"] == limit


@pytest.mark.real_server
def test_beyond_the_request_limit_answers_503_and_long_polls_do_not_count(server_factory):
    srv = server_factory(max_requests_in_flight=2, max_longpolls=3)
    dev = srv.register("adm-1")
    pending = beat(srv.client, "adm-1", dev.headers).json()["pending"]
    waiting = lambda: srv.cp.metrics.longpolls.labels("heartbeat")._value.get()  # noqa: E731
    pool = concurrent.futures.ThreadPoolExecutor(4)
    clients = [httpx.Client(base_url=srv.url, timeout=60) for _ in range(4)]
    try:
        body = {"seq": 2, "uptime": 1, "config_version": pending["config_version"],
                "state_version": pending["state_version"]}
        polls = [pool.submit(c.post, "/api/v1/devices/adm-1/heartbeat", json=body, headers=dev.headers,
                             params={"wait": 60}) for c in clients[:3]]
        wait_until(lambda: waiting() == 3 or any(p.done() for p in polls))
        assert waiting() == 3, [p.result().text for p in polls if p.done()]
        # the long-poll limit is its own: a 4th waits for nobody
        _busy(clients[3].post("/api/v1/devices/adm-1/heartbeat", json=body, headers=dev.headers,
                              params={"wait": 60}), "longpolls")
        # three long-polls held, request limit 2: a plain heartbeat still gets through
        assert beat(srv.client, "adm-1", dev.headers, seq=3).status_code == 200
        held = [_hold_request(srv.url, "/api/v1/devices/adm-1/heartbeat", dev.token) for _ in range(2)]
        wait_until(lambda: metric(srv.client, "picoiot_requests_in_flight") == 2)
        _busy(beat(srv.client, "adm-1", dev.headers, seq=4), "requests")
        assert srv.client.get("/health").status_code == 200  # probes are never refused
        assert [_finish(s) for s in held] == [200, 200]  # admitted work completes
        assert beat(srv.client, "adm-1", dev.headers, seq=5).status_code == 200
        # a change wakes the held long-polls
        r = srv.client.patch("/api/v1/namespaces/default/devices/adm-1/config",
                             json={"overrides": {"log": {"level": "debug"}}}, headers=srv.auth())
        assert r.status_code == 200, r.text
        for p in polls:
            answer = p.result(timeout=60)
            assert answer.status_code == 200 and answer.json()["pending"]["config_version"] == r.json()["version"]
        assert metric(srv.client, "picoiot_overload_rejections_total", 'kind="request"') == 1
        assert metric(srv.client, "picoiot_overload_rejections_total", 'kind="longpoll"') == 1
    finally:
        for c in clients:
            c.close()
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.real_server
def test_beyond_the_registration_limit_answers_503_and_other_requests_go_on(server_factory):
    # a restarted control plane meets its whole fleet registering at once: the surplus is told to come back (503 +
    # Retry-After) instead of waiting in a queue until the devices' own timeouts cut it off
    srv = server_factory(max_registrations_in_flight=2)
    dev = srv.register("adm-2")
    held = [_hold_request(srv.url, "/api/devices/challenge", "-") for _ in range(2)]
    wait_until(lambda: metric(srv.client, "picoiot_requests_in_flight") == 2)
    _busy(srv.client.post("/api/devices/challenge", json={"device_id": "adm-3"}), "registrations")
    # an answer to a challenge gets up to twice the bound (its device was just given a nonce): 2 more, then 503
    held += [_hold_request(srv.url, "/api/devices/register", "-") for _ in range(2)]
    wait_until(lambda: metric(srv.client, "picoiot_requests_in_flight") == 4)
    _busy(srv.client.post("/api/devices/register", json={"device_id": "adm-3", "nonce": "0" * 32,
                                                           "signature": "0" * 64}), "registrations")
    assert beat(srv.client, "adm-2", dev.headers).status_code == 200  # a heartbeat is not a registration
    assert [_finish(s) for s in held] == [422] * 4  # admitted work completes (the held bodies are no registration)
    srv.register("adm-3")
    assert metric(srv.client, "picoiot_overload_rejections_total", 'kind="registration"') == 2


async def test_database_queue_is_bounded(tmp_path):
    settings = make_settings("sqlite", tmp_path, max_db_queue=1)
    db = Database(settings)
    db.threads = 1
    import anyio
    db.limiter = anyio.CapacityLimiter(1)
    release = threading.Event()
    try:
        running = asyncio.ensure_future(db.run(lambda conn: release.wait(30)))
        while db.limiter.borrowed_tokens < 1:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(db.run(lambda conn: 7))
        while db.limiter.statistics().tasks_waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(DatabaseBusy):
            await db.run(lambda conn: 8)
        release.set()
        assert await running is True and await queued == 7
        assert await db.run(lambda conn: 9) == 9  # room again
    finally:
        release.set()
        db.dispose()


# ------------------------------------------------------------------------------------------------ --workers N
class WorkersProc:
    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "picoiot.cli", "server", "--host", "127.0.0.1",
                                      "--port", "0", "--data-dir", str(data_dir), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.url = None

    def wait_started(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}): {self.log()}")
            try:
                info = json.loads((self.data_dir / "server.json").read_text())
                if info.get("pid") == self.proc.pid:
                    self.url = info["url"]
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def test_workers_refused_on_sqlite(tmp_path):
    p = WorkersProc(tmp_path / "d", "--workers", "2")
    assert p.proc.wait(60) == 2
    p.stop()
    assert "--workers > 1 needs PostgreSQL" in p.log()


def test_two_workers_on_postgres_share_the_port_and_wake_each_others_long_polls(tmp_path):
    require_pg()
    schema = f"wk_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    p = WorkersProc(tmp_path / "d", "--workers", "2", "--db", PG_URL, "--db-schema", schema)
    clients: list[httpx.Client] = []
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        p.wait_started()
        # one keep-alive connection per worker: /health says which process answers on it
        by_pid: dict[int, httpx.Client] = {}
        deadline = time.monotonic() + 60
        while len(by_pid) < 2:
            assert time.monotonic() < deadline, f"only workers {list(by_pid)} ever answered"
            c = httpx.Client(base_url=p.url, timeout=60)
            clients.append(c)
            pid = int(c.get("/health").headers["x-picoiot-pid"])
            assert pid != p.proc.pid  # the supervisor does not serve
            by_pid.setdefault(pid, c)
        (pid1, w1), (pid2, w2) = by_pid.items()
        pids = {int(c.get("/health").headers["x-picoiot-pid"]) for c in (w1, w2)}  # same connections, same workers
        assert pids == {pid1, pid2}

        secrets = json.loads((tmp_path / "d" / "secrets.json").read_text())
        admin = {"Authorization": "Bearer " + issue_token(secrets["signing_key"], "t", "default", "admin", 600)}
        key = derive_device_key(secrets["enrollment_keys"]["default"], "wk-1")
        # worker 1's own stream of changes, open before the registration: it tells when worker 2's NOTIFY arrived
        sse = _client_on(p.url, pid1, clients)
        with sse.stream("GET", "/api/v1/namespaces/default/events", headers=admin) as events:
            lines = events.iter_lines()
            assert next(lines).startswith("retry:")  # subscribed
            nonce = w1.post("/api/devices/challenge", json={"device_id": "wk-1"}).json()["nonce"]
            r = w2.post("/api/devices/register", json={"device_id": "wk-1", "nonce": nonce,  # the other's nonce
                                                      "signature": sign(key, nonce, "wk-1"), "device_type": "relays"})
            assert r.status_code == 200, r.text
            dev = {"Authorization": f"Bearer {r.json()['token']}"}
            # a fleet behind a round-robin balancer: the first heartbeat may reach worker 1 before the NOTIFY does
            # (it then reads the device from the database and answers as usual)
            assert beat(w1, "wk-1", dev).status_code == 200
            misses = metric(w1, "picoiot_version_cache_misses_total")
            while not _is_event(next(lines), "wk-1", "device"):
                pass
        # once it has arrived, worker 1 holds the device's versions: no heartbeat on either worker reads them again
        for c in (w1, w2):
            assert beat(c, "wk-1", dev).status_code == 200
        assert metric(w1, "picoiot_version_cache_misses_total") == misses
        assert metric(w2, "picoiot_version_cache_misses_total") == 0

        for holder, pid, writer, level in ((w1, pid1, w2, "debug"), (w2, pid2, w1, "warning")):
            pending = beat(holder, "wk-1", dev).json()["pending"]
            body = {"seq": 2, "uptime": 1, "config_version": pending["config_version"],
                    "state_version": pending["state_version"]}
            poll = pool.submit(holder.post, "/api/v1/devices/wk-1/heartbeat", json=body, headers=dev,
                               params={"wait": 60})
            # a second connection to the holder would land on either worker: ask the holder itself, in between
            wait_until(lambda: poll.done() or _waiting(p.url, pid) >= 1, timeout=30)
            assert not poll.done(), poll.result().text
            r = writer.patch("/api/v1/namespaces/default/devices/wk-1/config",
                             json={"overrides": {"log": {"level": level}}}, headers=admin)
            assert r.status_code == 200, r.text
            answer = poll.result(timeout=60)
            # the holder's wait is capped at half the TTL (17 s): a missed NOTIFY would answer the stale version
            assert answer.status_code == 200, answer.text
            assert answer.json()["pending"]["config_version"] == r.json()["version"]
    finally:
        for c in clients:
            c.close()
        pool.shutdown(wait=False, cancel_futures=True)
        code = p.stop()
        drop_schema(schema)
    assert code == 0, p.log()


def _is_event(line: str, dev: str, kind: str) -> bool:
    e = json.loads(line.removeprefix("data: ")) if line.startswith("data: ") else {}
    return e.get("dev") == dev and e.get("kind") == kind


def _client_on(url: str, pid: int, clients: list[httpx.Client]) -> httpx.Client:
    """A new keep-alive connection that worker `pid` accepted (the kernel spreads connections over the workers)."""
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"no connection reached worker {pid}"
        c = httpx.Client(base_url=url, timeout=60)
        clients.append(c)
        if int(c.get("/health").headers["x-picoiot-pid"]) == pid:
            return c


def _waiting(url: str, pid: int) -> float:
    """Long-polls waiting on worker `pid`: asked over fresh connections until one lands on that worker."""
    for _ in range(50):
        with httpx.Client(base_url=url, timeout=10) as c:  # one keep-alive connection: both requests, one worker
            if int(c.get("/health").headers["x-picoiot-pid"]) == pid:
                return metric(c, "picoiot_longpolls_waiting", 'kind="heartbeat"')
    return 0.0
