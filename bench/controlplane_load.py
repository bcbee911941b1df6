#!/usr/bin/env python3
"""Control-plane load: N simulated devices register (challenge–response) and heartbeat at an interval.

    .venv/bin/python bench/controlplane_load.py --devices 20000 --interval 10 --duration 30 --db both

For each database it starts its own `picoiot server` (a subprocess on a free port, a temporary data dir; on PostgreSQL
a fresh schema, dropped afterwards) and runs, from separate client processes (so the client is not measured as part
of the server and does not starve it of the event loop):

1. register   every device: POST /api/devices/challenge, then /register with HMAC(device_key, nonce|device_id)
2. capacity   closed loop, --concurrency requests in flight, as fast as the server answers, in --capacity-rounds
              short rounds that alternate the no-op endpoint (/health) and heartbeats. Ratio = the median over
              the rounds of heartbeat rate / no-op rate (same server, same run, moments apart), also shown as
              the ratio of the server's CPU time per request.
3. sustained  every device heartbeats every --interval s (open loop, random phase, one request in flight per device,
              `Connection: close` like a Pico W): achieved heartbeats/s, p50/p99 latency, errors, how late the
              client sent (if the client lags, its figures are the client's, and it says so). If the server cannot
              keep up, a second sustained run with as many devices as 60 % of the measured heartbeat capacity shows
              what it does sustain. Capacity runs first so an overloaded sustained phase cannot poison it; before
              each phase the bench waits (bounded) until /health answers again.

The bench's devices do not heartbeat while the others register (minutes for 20,000) nor during the capacity phases,
where a real device would have been beating all along; so that they are not called offline meanwhile (which would make
their next heartbeat an offline→online write instead of the steady state measured here), the server is started with
`--ttl-slack` covering the whole run, and the sustained phase's warm-up is one full interval, so every device has
beaten once before the window opens.

Also printed: CPU used by the server process, the client processes and PostgreSQL during each phase, the whole
machine's busy share (other work on a shared box shows up there), and the server's counters over the phase (version
cache misses, JWT checks, offline transitions, 503s, heartbeats) — they show which path the requests took. Target (issue 3, PostgreSQL, 2 cores):
≥ 2,000 heartbeats/s sustained at p99 < 100 ms, and heartbeat capacity ≥ 0.6 × the no-op capacity.

Every phase is bounded in time; the servers are stopped and the schema dropped whatever happens.
`--profile DIR` records the server with py-spy during the heartbeat capacity phase (storm scenario: during each storm)
and prints where the time went.

    .venv/bin/python bench/controlplane_load.py --scenario storm --devices 2000 --storm-rounds 4 --ab-launcher OLD.py

restarts the control plane 4 times, alternating this tree and OLD.py (a launcher running another tree), and measures
each re-registration storm: time until all are registered, registrations/s, server CPU per registration.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import pg, servers  # noqa: E402  (the test harness: `picoiot server` as a subprocess)

PG_URL = os.environ.get("PICOIOT_BENCH_PG") or pg.PG_URL
NAMESPACE = "default"
TARGET_RATE = 2000.0
TARGET_P99_MS = 100.0
TARGET_RATIO = 0.6
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ============================================================================================ raw HTTP/1.1 client
class HttpError(Exception):
    pass


class _Exchange(asyncio.Protocol):
    """One request on one connection (the device's `Connection: close` pattern); resolves to (status, body)."""

    __slots__ = ("request", "future", "buf", "transport")

    def __init__(self, request: bytes, future: asyncio.Future):
        self.request = request
        self.future = future
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        self.buf += data
        result = _parse(self.buf)
        if result is not None and not self.future.done():
            self.future.set_result(result)
            self.transport.close()

    def connection_lost(self, exc):
        if not self.future.done():
            result = _parse(self.buf, eof=True)
            if result is not None:
                self.future.set_result(result)
            else:
                self.future.set_exception(HttpError(f"connection lost ({exc or 'EOF'}) after {len(self.buf)} bytes"))


class _KeepAlive(asyncio.Protocol):
    """A persistent connection for the capacity phase with --keepalive: one request at a time."""

    def __init__(self):
        self.buf = b""
        self.future: asyncio.Future | None = None
        self.transport = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future:
        self.buf = b""
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.future

    def data_received(self, data):
        self.buf += data
        result = _parse(self.buf)
        if result is not None and self.future is not None and not self.future.done():
            self.future.set_result(result)

    def connection_lost(self, exc):
        self.closed = True
        if self.future is not None and not self.future.done():
            self.future.set_exception(HttpError(f"connection lost ({exc or 'EOF'})"))


class _Body(bytes):
    """A refused answer's body, with its Retry-After header (None if it had none)."""
    retry_after: str | None = None


def _refused(status: int, head: bytes, body: bytes) -> bytes:
    if status < 400:
        return body
    out = _Body(body)
    i = head.find(b"\r\nretry-after:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        out.retry_after = head[i + 14:j if j > 0 else len(head)].strip().decode()
    return out


def _parse(buf: bytes, eof: bool = False):
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    try:
        status = int(buf[9:12])
    except ValueError:
        raise HttpError(f"bad status line {buf[:40]!r}") from None
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        return (status, _refused(status, head, buf[end + 4:])) if eof else None
    j = head.find(b"\r\n", i + 2)
    length = int(head[i + 17:j if j > 0 else len(head)])
    body = buf[end + 4:]
    if len(body) < length:
        return None
    return status, _refused(status, head, body[:length])


def _request(method: str, host: str, path: str, body: bytes = b"", token: str | None = None,
             keepalive: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: " + ("keep-alive" if keepalive else "close")]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body or method == "POST":
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _call(host: str, port: int, request: bytes, timeout: float) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    try:
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: _Exchange(request, fut), host, port),
                                              timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise HttpError(f"connect: {type(e).__name__}") from None
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise HttpError("timeout") from None
    finally:
        transport.close()


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100.0 * len(sorted_ms)))]


# ============================================================================================ client process
class Client:
    """Runs in its own process: registers a slice of the devices, then runs the phases the parent asks for."""

    def __init__(self, url: str, enrollment_key: str, device_ids: list[str], timeout: float):
        hostport = url.split("://", 1)[1].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.hosthdr = hostport
        self.enrollment_key = enrollment_key
        self.ids = device_ids
        self.timeout = timeout
        self.tokens: dict[str, str] = {}

    def _key(self, dev: str) -> str:
        return hmac.new(self.enrollment_key.encode(), dev.encode(), hashlib.sha256).hexdigest()

    async def register(self, concurrency: int, time_limit: float) -> dict:
        errors: Counter = Counter()
        lat: list[float] = []
        queue = list(reversed(self.ids))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit

        async def one(dev: str) -> None:
            t0 = time.perf_counter()
            body = json.dumps({"device_id": dev, "namespace": NAMESPACE}).encode()
            st, out = await _call(self.host, self.port, _request("POST", self.hosthdr, "/api/devices/challenge", body),
                                  self.timeout)
            if st != 200:
                raise HttpError(f"challenge {st}")
            nonce = json.loads(out)["nonce"]
            sig = hmac.new(self._key(dev).encode(), f"{nonce}|{dev}".encode(), hashlib.sha256).hexdigest()
            body = json.dumps({"device_id": dev, "nonce": nonce, "signature": sig, "device_type": "relays",
                               "firmware": "0.1.0", "capabilities": ["relays", "rest"],
                               "address": "http://10.0.0.1:80", "reset_cause": "power_on"}).encode()
            st, out = await _call(self.host, self.port, _request("POST", self.hosthdr, "/api/devices/register", body),
                                  self.timeout)
            if st != 200:
                raise HttpError(f"register {st}: {out[:100]!r}")
            self.tokens[dev] = json.loads(out)["token"]
            lat.append((time.perf_counter() - t0) * 1000)

        async def worker() -> None:
            while queue and loop.time() < deadline:
                dev = queue.pop()
                try:
                    await one(dev)
                except HttpError as e:
                    errors[str(e)[:60]] += 1

        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
        return {"ok": len(self.tokens), "errors": dict(errors), "wall": wall, "lat": lat,
                "cpu": time.process_time() - cpu0, "unfinished": len(queue)}

    def _heartbeat_request(self, dev: str, seq: int, versions: list[int], keepalive: bool = False) -> bytes:
        body = (b'{"seq":%d,"uptime":%d,"mem_free":81234,"rssi":-61,"reconnects":0,"firmware":"0.1.0",'
                b'"config_version":%d,"state_version":%d}' % (seq, seq * 10, versions[0], versions[1]))
        return _request("POST", self.hosthdr, f"/api/v1/devices/{dev}/heartbeat", body, self.tokens[dev], keepalive)

    async def sustained(self, start_wall: float, interval: float, warmup: float, duration: float,
                        limit: int | None = None) -> dict:
        loop = asyncio.get_running_loop()
        start = loop.time() + (start_wall - time.time())
        w0, w1 = start + warmup, start + warmup + duration
        end = w1 + interval  # requests scheduled inside the window may complete after it; bounded below
        lat: list[float] = []
        lag: list[float] = []
        errors: Counter = Counter()
        counts = {"sent_in_window": 0, "ok_in_window": 0}
        rnd = random.Random(os.getpid())

        async def device(dev: str) -> None:
            versions = [0, 0]
            seq = 0
            due = start + rnd.uniform(0, interval)
            while due < w1:
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = loop.time()
                p0 = time.perf_counter()
                seq += 1
                in_window = w0 <= due < w1
                try:
                    st, out = await _call(self.host, self.port, self._heartbeat_request(dev, seq, versions),
                                          self.timeout)
                except HttpError as e:
                    st, out = None, str(e).encode()
                p1 = time.perf_counter()
                if in_window:
                    counts["sent_in_window"] += 1
                    lag.append((t0 - due) * 1000)
                    if st == 200:
                        counts["ok_in_window"] += 1
                        lat.append((p1 - p0) * 1000)
                    else:
                        errors[f"{st} {out[:60]!r}"] += 1
                if st == 200:
                    pending = json.loads(out)["pending"]
                    versions = [pending["config_version"], pending["state_version"]]
                due += interval
                if loop.time() > end:
                    break

        cpu0 = time.process_time()
        tasks = [asyncio.create_task(device(d)) for d in list(self.tokens)[:limit]]
        # 20,000 device tasks and their tokens live through the phase: out of the collector's sight, so the client's
        # own full collections (tens of ms with that many objects) do not show up as server latency
        gc.collect()
        gc.freeze()
        try:
            await asyncio.wait(tasks, timeout=max(0.0, end - loop.time()) + self.timeout + 5)
        finally:
            gc.unfreeze()
        for t in tasks:
            t.cancel()
        cpu_window = time.process_time() - cpu0
        return {"lat": lat, "lag": lag, "errors": dict(errors), **counts, "cpu": cpu_window,
                "wall": loop.time() - start}

    async def capacity(self, kind: str, concurrency: int, start_wall: float, duration: float,
                       keepalive: bool) -> dict:
        loop = asyncio.get_running_loop()
        start = loop.time() + (start_wall - time.time())
        stop = start + duration
        lat: list[float] = []
        errors: Counter = Counter()
        devs = list(self.tokens)
        seqs = {d: 1000 for d in devs}
        rnd = random.Random(os.getpid() + 1)
        health = _request("GET", self.hosthdr, "/health", keepalive=keepalive)

        def next_request() -> bytes:
            if kind == "health":
                return health
            dev = devs[rnd.randrange(len(devs))]
            seqs[dev] += 1
            return self._heartbeat_request(dev, seqs[dev], [0, 0], keepalive)

        async def worker() -> None:
            await asyncio.sleep(max(0.0, start - loop.time()))
            conn: _KeepAlive | None = None
            while loop.time() < stop:
                req = next_request()
                t0 = time.perf_counter()
                try:
                    if keepalive:
                        if conn is None or conn.closed:
                            _, conn = await loop.create_connection(_KeepAlive, self.host, self.port)
                        st, out = await asyncio.wait_for(conn.send(req), self.timeout)
                    else:
                        st, out = await _call(self.host, self.port, req, self.timeout)
                except (HttpError, OSError, asyncio.TimeoutError) as e:
                    errors[type(e).__name__ + " " + str(e)[:50]] += 1
                    conn = None
                    continue
                if st == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors[f"{st} {out[:60]!r}"] += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()

        cpu0 = time.process_time()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               max(0.0, stop - loop.time()) + self.timeout + 5)
        return {"lat": lat, "errors": dict(errors), "cpu": time.process_time() - cpu0, "wall": duration}


    async def retarget(self, url: str) -> dict:
        """Talk to another server from now on (the fleet scenario's restarted control plane)."""
        hostport = url.split("://", 1)[1].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.hosthdr = hostport
        return {}

    async def longpoll(self, start_wall: float, hold: float, spread: float, warmup: float, duration: float) -> dict:
        """Every device holds its heartbeat as a long-poll (`?wait=hold`, the firmware's push) and polls again at once
        when it comes back: one heartbeat per device per `hold` seconds. Recorded in the window: polls completed
        (= heartbeats/s), how late a poll that timed out came back beyond its hold (the heartbeat's own latency),
        and for every poll that brought a new state version, (device, version, wall time received) — the parent
        matches them with its writes."""
        loop = asyncio.get_running_loop()
        start = loop.time() + (start_wall - time.time())
        w0, w1 = start + warmup, start + warmup + duration
        over: list[float] = []
        quick: list[float] = []
        wakes: list[tuple[str, int, float]] = []
        errors: Counter = Counter()
        counts = {"polls_in_window": 0}
        rnd = random.Random(os.getpid() + 2)

        async def device(dev: str) -> None:
            versions = [0, 0]
            synced = False  # the first answer tells the versions; only later ones can be wake-ups
            seq = 0
            await asyncio.sleep(max(0.0, start - loop.time()) + rnd.uniform(0, spread))
            while loop.time() < w1:
                seq += 1
                body = (b'{"seq":%d,"uptime":%d,"firmware":"0.1.0","config_version":%d,"state_version":%d}'
                        % (seq, seq * 10, versions[0], versions[1]))
                path = (f"/api/v1/devices/{dev}/heartbeat?wait={hold:g}&config_version={versions[0]}"
                        f"&state_version={versions[1]}&ota=")
                t0 = loop.time()
                try:
                    st, out = await _call(self.host, self.port,
                                          _request("POST", self.hosthdr, path, body, self.tokens[dev]),
                                          hold + self.timeout)
                except HttpError as e:
                    st, out = None, str(e).encode()
                t1 = loop.time()
                inside = w0 <= t1 < w1
                if st != 200:
                    if inside:
                        errors[f"{st} {out[:60]!r}"] += 1
                    await asyncio.sleep(rnd.uniform(0.5, 1.5))  # the firmware's jittered retry, shortened
                    continue
                pending = json.loads(out)["pending"]
                news = pending["state_version"] != versions[1] or pending["config_version"] != versions[0]
                if inside:
                    counts["polls_in_window"] += 1
                    if pending["state_version"] != versions[1] and synced:
                        wakes.append((dev, pending["state_version"], time.time()))
                    elif not news and t1 - t0 >= hold:
                        over.append((t1 - t0 - hold) * 1000)
                    elif news:
                        quick.append((t1 - t0) * 1000)
                versions = [pending["config_version"], pending["state_version"]]
                synced = True

        cpu0 = time.process_time()
        tasks = [asyncio.create_task(device(d)) for d in self.tokens]
        gc.collect()
        gc.freeze()
        try:
            await asyncio.wait(tasks, timeout=max(0.0, w1 - loop.time()) + hold + self.timeout + 10)
        finally:
            gc.unfreeze()
        for t in tasks:
            t.cancel()
        return {"lat": over, "quick": quick, "wakes": wakes, "errors": dict(errors), **counts,
                "cpu": time.process_time() - cpu0, "wall": loop.time() - start}

    async def storm(self, spread: float, time_limit: float) -> dict:
        """Every device registers again (challenge + register) at a random moment within `spread` seconds, as after a
        control-plane restart, and retries as the firmware does (`backoff`). Returned: how many registered, when
        (wall clock), every status seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        statuses: Counter = Counter()
        done: list[float] = []
        lat: list[float] = []
        rnd = random.Random(os.getpid() + 3)
        bad_retry_after = Counter()

        async def post(path: str, body: dict) -> tuple[int | None, bytes]:
            try:
                st, out = await _call(self.host, self.port,
                                      _request("POST", self.hosthdr, path, json.dumps(body).encode()), self.timeout)
            except HttpError as e:
                st, out = None, str(e).encode()
            statuses[f"{path.rsplit('/', 1)[1]} {st}"] += 1
            return st, out

        async def backoff(st, out, delay: float) -> float:
            """The firmware's registration retry (iotlib.device): wait ½…1 of a delay that doubles from 2 s to 60 s,
            and not less than a 503's Retry-After; returns the next delay."""
            wait = delay * rnd.uniform(0.5, 1.0)
            if st in (429, 503):  # deliberate load shedding carries Retry-After; a 503 without one is a failure
                ra = getattr(out, "retry_after", None)
                if ra and ra.isdigit():
                    wait = max(wait, float(ra))
                else:
                    bad_retry_after[st] += 1
            await asyncio.sleep(wait)
            return min(delay * 2, 60.0)

        async def one(dev: str) -> None:
            await asyncio.sleep(rnd.uniform(0, spread))
            t0 = time.perf_counter()
            delay = 2.0
            while loop.time() < deadline:
                st, out = await post("/api/devices/challenge", {"device_id": dev, "namespace": NAMESPACE})
                if st != 200:
                    delay = await backoff(st, out, delay)
                    continue
                nonce = json.loads(out)["nonce"]
                sig = hmac.new(self._key(dev).encode(), f"{nonce}|{dev}".encode(), hashlib.sha256).hexdigest()
                st, out = await post("/api/devices/register", {
                    "device_id": dev, "nonce": nonce, "signature": sig, "device_type": "relays", "firmware": "0.1.0",
                    "capabilities": ["relays", "rest"], "address": "http://10.0.0.1:80", "reset_cause": "power_on"})
                if st == 200:
                    self.tokens[dev] = json.loads(out)["token"]
                    done.append(time.time())
                    lat.append((time.perf_counter() - t0) * 1000)
                    return
                delay = await backoff(st, out, delay)

        cpu0 = time.process_time()
        await asyncio.gather(*(one(d) for d in self.ids))
        return {"done": done, "lat": lat, "statuses": dict(statuses), "bad_retry_after": dict(bad_retry_after),
                "cpu": time.process_time() - cpu0, "ok": len(done), "errors": {}}


def client_main(conn, url: str, enrollment_key: str, device_ids: list[str], timeout: float) -> None:
    """Client process entry: executes (command, kwargs) messages from the parent until ("quit",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    client = Client(url, enrollment_key, device_ids, timeout)
    loop = asyncio.new_event_loop()
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                return
            fn = getattr(client, msg[0])
            try:
                conn.send(("ok", loop.run_until_complete(fn(**msg[1]))))
            except Exception as e:  # report, do not hang the parent
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        loop.close()


# ============================================================================================ CPU accounting
def _proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (the workers of `picoiot server --workers N`)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    return own + sum(_proc_cpu(c) for c in children)


def _postgres_cpu() -> float:
    """CPU seconds of every process named `postgres` (the PostgreSQL backends serving the server)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        total += _proc_cpu(int(entry))
    return total


def _machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


class CpuWatch:
    def __init__(self, server_pid: int, with_pg: bool):
        self.server_pid, self.with_pg = server_pid, with_pg

    def __enter__(self):
        self.t0 = time.monotonic()
        self.srv0 = _proc_cpu(self.server_pid)
        self.pg0 = _postgres_cpu() if self.with_pg else 0.0
        self.busy0 = _machine_busy()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        self.server = (_proc_cpu(self.server_pid) - self.srv0) / self.wall
        # backends that exit during the phase take their CPU time with them: a floor, never negative
        self.pg = max(0.0, (_postgres_cpu() - self.pg0) / self.wall) if self.with_pg else 0.0
        busy1 = _machine_busy()
        self.machine = (busy1[0] - self.busy0[0]) / max(1, busy1[1] - self.busy0[1]) * os.cpu_count()


# ============================================================================================ server process
class ServerProcess(servers.ServerProcess):
    """`picoiot server` (tests/support), started at once, with the enrollment key the simulated fleet signs with."""

    def __init__(self, backend: str, workdir: Path, log_path: Path, launcher: str | None = None,
                 extra: tuple[str, ...] = (), schema: str | None = None, secrets_from: Path | None = None):
        """`schema`: join that PostgreSQL schema (another server's, left to it to drop); `secrets_from`: a data dir
        whose secrets (signing and enrollment keys) this server shares, so tokens and keys work on both."""
        self.backend = backend
        self.owns_schema = schema is None
        self.schema = schema or (pg.new_schema("bench") if backend == "postgres" else None)
        self.launcher = launcher
        super().__init__(workdir / "data", db=PG_URL if backend == "postgres" else None, db_schema=self.schema,
                         fast=False, extra=("--challenge-rate", "0", *extra),  # the whole fleet is one address
                         secrets_from=secrets_from, log=log_path)
        self.start(60)
        self.enrollment_key = self.settings.secrets.enrollment_key(NAMESPACE)

    def argv(self) -> list[str]:
        a = super().argv()
        return [a[0], self.launcher, *a[3:]] if self.launcher else a  # the launcher instead of `-m picoiot.cli`

    def stop(self) -> None:
        super().stop()
        self.client.close()
        if self.schema and self.owns_schema:
            try:
                pg.drop_schema(self.schema, PG_URL)
            except Exception as e:
                print(f"warning: could not drop schema {self.schema}: {e}", file=sys.stderr)


# ============================================================================================ orchestration
class Clients:
    def __init__(self, n_procs: int, server: ServerProcess, device_ids: list[str], timeout: float):
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for i in range(n_procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, server.url, server.enrollment_key,
                                                      device_ids[i::n_procs], timeout), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, command: str, wait_s: float, **kw) -> list[dict]:
        for pipe in self.pipes:
            pipe.send((command, kw))
        out = []
        for pipe in self.pipes:
            if not pipe.poll(wait_s):
                raise RuntimeError(f"client did not finish {command} within {wait_s:.0f} s")
            status, result = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"client failed in {command}: {result}")
            out.append(result)
        return out

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _merge(results: list[dict]) -> dict:
    out: dict = {"lat": [], "lag": [], "errors": Counter(), "cpu": 0.0}
    for r in results:
        out["lat"] += r.get("lat", [])
        out["lag"] += r.get("lag", [])
        out["errors"].update(r.get("errors", {}))
        out["cpu"] += r.get("cpu", 0.0)
        for k in ("ok", "sent_in_window", "ok_in_window", "unfinished"):
            out[k] = out.get(k, 0) + r.get(k, 0)
        out["wall"] = max(out.get("wall", 0.0), r.get("wall", 0.0))
    out["lat"].sort()
    out["lag"].sort()
    return out


def _profile_start(pid: int, duration: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("  (--profile: py-spy not installed; pip install py-spy)")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "250",
                             "--format", "raw", "--subprocesses", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _profile_report(path: Path, top: int = 22) -> list[str]:
    """Self and inclusive time per function from py-spy's collapsed stacks (idle worker threads left out)."""
    if not path.exists():
        return ["  (no profile written)"]
    selfc: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        try:
            count = int(n)
        except ValueError:
            continue
        names = [_frame_name(fr) for fr in stack.split(";") if fr]
        if not names or names[-1].startswith(("Condition.wait", "Queue.get")):
            continue  # a thread-pool worker waiting for work
        total += count
        selfc[names[-1]] += count
        for name in set(names):
            incl[name] += count
    if not total:
        return ["  (empty profile)"]
    lines = [f"  py-spy: {total} busy samples; self time:"]
    lines += [f"    {c / total * 100:5.1f}%  {name}" for name, c in selfc.most_common(top)]
    lines.append("  inclusive time (frames under 90% — below the event loop and framework entry points):")
    shown = 0
    for name, c in incl.most_common():
        if c / total < 0.9:
            lines.append(f"    {c / total * 100:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
    return lines


def _frame_name(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    func, _, loc = frame.partition(" (")
    return f"{func} ({loc.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if loc else func


def _register_phase(clients: Clients, server: ServerProcess, pg: bool, args, label: str) -> tuple[dict, dict]:
    """Every device registers once (--register-concurrency in flight); prints and returns (merged results, figures)."""
    with CpuWatch(server.pid, pg) as cpu:
        reg = _merge(clients.run("register", args.register_timeout + 30,
                                 concurrency=max(1, args.register_concurrency // args.client_procs),
                                 time_limit=args.register_timeout))
    out = {"ok": reg["ok"], "rate": reg["ok"] / cpu.wall, "p50_ms": _pct(reg["lat"], 50),
           "p99_ms": _pct(reg["lat"], 99), "errors": dict(reg["errors"]), "server_cpu": cpu.server,
           "client_cpu": reg["cpu"] / cpu.wall, "pg_cpu": cpu.pg, "machine_busy": cpu.machine}
    _print_phase(label, out, "registrations/s")
    return reg, out


def run_backend(backend: str, args, workdir: Path) -> dict:
    print(f"\n== {backend}: starting picoiot server ...", flush=True)
    # A real device heartbeats from the moment it registers; the bench's devices wait until every device has
    # registered (minutes for 20,000) and through the capacity phases. So that they are not called offline meanwhile
    # — which would turn their next heartbeat into an offline→online transition, a write, instead of the steady
    # state measured here — the server gives them a TTL slack covering the whole run.
    slack = int(args.register_timeout + 2 * args.capacity_rounds * (args.capacity_duration + 2) + 300)
    server = ServerProcess(backend, workdir / backend, workdir / f"server-{backend}.log", args.server_launcher,
                           extra=("--ttl-slack", str(slack)))
    device_ids = [f"bench-{i:06d}" for i in range(args.devices)]
    clients = None
    res: dict = {"backend": backend, "devices": args.devices, "interval": args.interval}
    try:
        print(f"   {server.url} (pid {server.pid}){' schema ' + server.schema if server.schema else ''}")
        clients = Clients(args.client_procs, server, device_ids, args.timeout)
        pg = backend == "postgres"

        c0 = _counters(server.url)
        reg, res["register"] = _register_phase(clients, server, pg, args, "register")
        res["register"]["counters"] = _print_counters(c0, _counters(server.url))
        if reg["ok"] == 0:
            raise RuntimeError(f"no device registered: {dict(reg['errors'])}")

        def sustained(n_devices: int, label: str) -> dict:
            _settle(server.url)
            warmup = args.interval + 1.0  # every device beats once before the window opens
            start = time.time() + 1.0
            c0 = _counters(server.url)
            with CpuWatch(server.pid, pg) as cpu:
                sus = _merge(clients.run("sustained", warmup + args.duration + args.interval + args.timeout + 180,
                                         start_wall=start, interval=args.interval, warmup=warmup,
                                         duration=args.duration, limit=max(1, n_devices // args.client_procs)))
            offered = n_devices / args.interval
            out = {"devices": n_devices, "offered": offered, "rate": sus["ok_in_window"] / args.duration,
                   "p50_ms": _pct(sus["lat"], 50), "p99_ms": _pct(sus["lat"], 99),
                   "max_ms": sus["lat"][-1] if sus["lat"] else float("nan"),
                   "client_lag_p99_ms": _pct(sus["lag"], 99), "errors": dict(sus["errors"]),
                   "server_cpu": cpu.server, "client_cpu": sus["cpu"] / cpu.wall, "pg_cpu": cpu.pg,
                   "machine_busy": cpu.machine}
            _print_phase(f"sustained{label} ({n_devices} devices / {args.interval:g} s, offered {offered:.0f}/s)",
                         out, "heartbeats/s")
            out["counters"] = _print_counters(c0, _counters(server.url))
            if out["client_lag_p99_ms"] > 50:
                print(f"   ! the client sent late (p99 lag {out['client_lag_p99_ms']:.0f} ms): "
                      f"the machine is saturated (or add --client-procs)")
            return out

        def capacity_round(kind: str, profile: bool) -> dict:
            prof = None
            if profile:
                prof_path = Path(args.profile) / f"{backend}-heartbeat.txt"
                prof_path.parent.mkdir(parents=True, exist_ok=True)
                prof = _profile_start(server.pid, args.capacity_duration, prof_path)
            _settle(server.url)
            start = time.time() + 0.5
            c0 = _counters(server.url)
            with CpuWatch(server.pid, pg) as cpu:
                cap = _merge(clients.run("capacity", args.capacity_duration + args.timeout + 30, kind=kind,
                                         concurrency=max(1, args.concurrency // args.client_procs),
                                         start_wall=start, duration=args.capacity_duration,
                                         keepalive=args.keepalive))
            out = {"lat": cap["lat"], "errors": cap["errors"], "rate": len(cap["lat"]) / args.capacity_duration,
                   "server_cpu_s": cpu.server * cpu.wall, "client_cpu_s": cap["cpu"], "pg_cpu_s": cpu.pg * cpu.wall,
                   "machine_busy_s": cpu.machine * cpu.wall, "wall": cpu.wall,
                   "counters": _counter_delta(c0, _counters(server.url))}
            out["server_us_per_req"] = out["server_cpu_s"] / max(1, len(cap["lat"])) * 1e6
            if prof is not None:
                try:
                    _, err = prof.communicate(timeout=args.capacity_duration + 30)
                except subprocess.TimeoutExpired:
                    prof.kill()
                    err = b"timeout"
                if prof.returncode:
                    print(f"  py-spy failed: {err.decode(errors='replace')[-300:]}")
                res["profile"] = _profile_report(prof_path)
            return out

        # The two kinds alternate in short rounds and the ratio is the median of the rounds' ratios: on a shared
        # (virtual) machine the speed of the same server drifts by up to 40 % within minutes (docs/benchmarks.md),
        # so one long phase of each would mostly compare two moments, not two requests.
        rounds: dict[str, list[dict]] = {"health": [], "heartbeat": []}
        print(f"   capacity ({args.concurrency} in flight{', keep-alive' if args.keepalive else ', Connection: close'}"
              f"; {args.capacity_rounds} rounds of {args.capacity_duration:g} s per kind, alternating):", flush=True)
        for i in range(args.capacity_rounds):
            for kind in ("health", "heartbeat"):
                rounds[kind].append(capacity_round(kind, bool(args.profile) and kind == "heartbeat" and i == 0))
            h, b = rounds["health"][-1], rounds["heartbeat"][-1]
            print(f"      round {i + 1}: /health {h['rate']:.0f}/s ({h['server_us_per_req']:.0f} µs server CPU each), "
                  f"heartbeat {b['rate']:.0f}/s ({b['server_us_per_req']:.0f} µs), "
                  f"ratio {b['rate'] / h['rate'] if h['rate'] else float('nan'):.2f}", flush=True)
        for kind in ("health", "heartbeat"):
            rs = rounds[kind]
            lat = sorted(x for r in rs for x in r["lat"])
            wall = sum(r["wall"] for r in rs)
            errors: Counter = Counter()
            for r in rs:
                errors.update(r["errors"])
            res[f"capacity_{kind}"] = {
                "rate": statistics.median(r["rate"] for r in rs), "rates": [r["rate"] for r in rs],
                "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "errors": dict(errors),
                "server_cpu": sum(r["server_cpu_s"] for r in rs) / wall,
                "client_cpu": sum(r["client_cpu_s"] for r in rs) / wall,
                "pg_cpu": sum(r["pg_cpu_s"] for r in rs) / wall,
                "machine_busy": sum(r["machine_busy_s"] for r in rs) / wall,
                "server_us_per_req": statistics.median(r["server_us_per_req"] for r in rs),
                "counters": {k: sum(r["counters"][k] for r in rs) for k in rs[0]["counters"]}}
            _print_phase(f"capacity {kind}, median of {len(rs)} rounds", res[f"capacity_{kind}"], "requests/s")
            print(f"      server CPU per request (median): {res[f'capacity_{kind}']['server_us_per_req']:.0f} µs")
            _print_delta(res[f"capacity_{kind}"]["counters"])
        if res.get("profile"):
            print("\n".join(res["profile"]))
        ratios = [b["rate"] / h["rate"] for h, b in zip(rounds["health"], rounds["heartbeat"]) if h["rate"]]
        cpu_ratios = [h["server_us_per_req"] / b["server_us_per_req"]
                      for h, b in zip(rounds["health"], rounds["heartbeat"]) if b["server_us_per_req"]]
        res["ratio"] = statistics.median(ratios) if ratios else float("nan")
        res["ratios"] = ratios
        res["cpu_ratio"] = statistics.median(cpu_ratios) if cpu_ratios else float("nan")
        print(f"   heartbeat / no-op capacity ratio: {res['ratio']:.2f} (median of rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)}); by server CPU per request: {res['cpu_ratio']:.2f}")
        res["sustained"] = sustained(reg["ok"], "")
        s = res["sustained"]
        if s["p99_ms"] >= TARGET_P99_MS or s["rate"] < 0.98 * s["offered"]:
            # Overloaded: also show what this server does sustain, at 60 % of its measured heartbeat capacity.
            n = min(reg["ok"], max(1, int(0.6 * res["capacity_heartbeat"]["rate"] * args.interval)))
            if n < reg["ok"]:
                res["sustained_at_60pct_capacity"] = sustained(n, " at 60% of capacity")
        res["meets_target"] = bool(s["rate"] >= TARGET_RATE and s["p99_ms"] < TARGET_P99_MS
                                   and res["ratio"] >= TARGET_RATIO)
        return res
    finally:
        if clients is not None:
            clients.close()
        server.stop()


# ============================================================================================ fleet scenario
def _operator_writes(url: str, token: str, devices: list[str], rate: float, start_wall: float, duration: float,
                     out: list) -> None:
    """An operator writes a desired relay state for random devices, `rate` per second from start_wall for duration
    seconds; out gets (device, new state version, wall time the write was sent)."""
    import httpx
    rnd = random.Random(7)
    state: dict[str, str] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        time.sleep(max(0.0, start_wall - time.time()))
        t_next = time.time()
        while time.time() < start_wall + duration:
            dev = devices[rnd.randrange(len(devices))]
            state[dev] = "off" if state.get(dev) == "on" else "on"
            t0 = time.time()
            try:
                r = c.post(f"/api/v1/namespaces/{NAMESPACE}/devices/{dev}/shadows/default",
                           json={"state": {"desired": {"relay1": state[dev]}}})
                if r.status_code == 200:
                    out.append((dev, r.json()["version"], t0))
                else:
                    out.append((dev, None, r.status_code))
            except httpx.HTTPError as e:
                out.append((dev, None, type(e).__name__))
            t_next += 1.0 / rate
            time.sleep(max(0.0, t_next - time.time()))


def _wake_latencies(writes: list, wakes: list) -> tuple[list[float], int]:
    """Per write: ms from the write being sent to the device's poll bringing that version (or a later one)."""
    seen: dict[str, list[tuple[int, float]]] = {}
    for dev, version, t in wakes:
        seen.setdefault(dev, []).append((version, t))
    lat, missed = [], 0
    for dev, version, t0 in writes:
        if version is None:
            continue
        got = [t for v, t in seen.get(dev, ()) if v >= version and t >= t0]
        if got:
            lat.append((min(got) - t0) * 1000)
        else:
            missed += 1
    return sorted(lat), missed


def run_fleet(args, workdir: Path) -> dict:
    """The fleet scenario on PostgreSQL (issue 13): every device holds its heartbeat as a long-poll, an operator's
    writes through a *second* server process wake them (LISTEN/NOTIFY), then the control plane restarts and the
    whole fleet registers again at once."""
    from picoiot.server.auth import issue_token
    n, hold = args.devices, args.interval
    res: dict = {"backend": "postgres", "scenario": "fleet", "devices": n, "hold_s": hold,
                 "workers": args.fleet_workers}
    # held polls are connections: one process cannot hold more than its file limit (ulimit -n), so the polls are
    # spread over --fleet-workers processes sharing the port, each allowed all of them (no 503 from the bench's size)
    a_extra = ("--workers", str(args.fleet_workers), "--max-longpolls", str(n + 100), "--ttl-slack", "900")
    print(f"\n== fleet: {n} devices holding heartbeat long-polls (hold {hold:g} s), PostgreSQL, "
          f"{args.fleet_workers} worker processes + 1 operator process", flush=True)
    a = ServerProcess("postgres", workdir / "a", workdir / "server-a.log", args.server_launcher, extra=a_extra)
    b = a2 = clients = None
    try:
        b = ServerProcess("postgres", workdir / "b", workdir / "server-b.log", args.server_launcher,
                          extra=("--ttl-slack", "900"), schema=a.schema, secrets_from=a.data_dir)
        print(f"   devices → {a.url} (pid {a.pid}), operator → {b.url} (pid {b.pid}), schema {a.schema}")
        device_ids = [f"fleet-{i:06d}" for i in range(n)]
        clients = Clients(args.client_procs, a, device_ids, args.timeout)
        reg, res["register"] = _register_phase(clients, a, True, args,
                                               f"register ({args.register_concurrency} in flight)")
        if reg["ok"] < n:
            raise RuntimeError(f"only {reg['ok']} of {n} devices registered: {dict(reg['errors'])}")

        # --- held long-polls, woken by an operator on the other process
        secrets = json.loads((a.data_dir / "secrets.json").read_text())
        token = issue_token(secrets["signing_key"], "bench-operator", NAMESPACE, "operator", 3600)
        warmup = hold + 2.0  # every device has begun polling (random phase over one hold) before the window
        start = time.time() + 2.0
        writes: list = []
        import threading
        writer = threading.Thread(target=_operator_writes, daemon=True,
                                  args=(b.url, token, device_ids, args.fleet_writes, start + warmup, args.duration,
                                        writes))
        writer.start()
        with CpuWatch(a.pid, True) as cpu:
            lp = clients.run("longpoll", warmup + args.duration + hold + args.timeout + 120, start_wall=start,
                             hold=hold, spread=hold, warmup=warmup, duration=args.duration)
        writer.join(30)
        over = sorted(x for r in lp for x in r["lat"])
        wakes = [w for r in lp for w in r["wakes"]]
        errors: Counter = Counter()
        for r in lp:
            errors.update(r["errors"])
        wake_ms, missed = _wake_latencies(writes, wakes)
        refused = [w for w in writes if w[1] is None]
        polls = sum(r["polls_in_window"] for r in lp)
        res["longpoll"] = {"rate": polls / args.duration, "offered": n / hold, "hold_over_p50_ms": _pct(over, 50),
                           "hold_over_p99_ms": _pct(over, 99), "errors": dict(errors),
                           "writes": len(writes), "writes_refused": len(refused), "woken": len(wake_ms),
                           "not_woken": missed, "wake_p50_ms": _pct(wake_ms, 50), "wake_p99_ms": _pct(wake_ms, 99),
                           "wake_max_ms": wake_ms[-1] if wake_ms else float("nan"),
                           "server_cpu": cpu.server, "pg_cpu": cpu.pg, "machine_busy": cpu.machine,
                           "client_cpu": sum(r["cpu"] for r in lp) / cpu.wall}
        L = res["longpoll"]
        print(f"   held polls: {L['rate']:.0f} heartbeats/s (offered {L['offered']:.0f}/s); a poll that timed out "
              f"came back {L['hold_over_p50_ms']:.1f} ms (p50) / {L['hold_over_p99_ms']:.1f} ms (p99) after its "
              f"hold; errors {sum(errors.values())}{' ' + str(dict(list(errors.items())[:3])) if errors else ''}")
        print(f"   operator writes on the other process: {L['writes']} ({L['writes_refused']} refused), woken "
              f"{L['woken']}, not woken in the window {L['not_woken']}: p50 {L['wake_p50_ms']:.1f} ms, "
              f"p99 {L['wake_p99_ms']:.1f} ms, max {L['wake_max_ms']:.1f} ms", flush=True)
        print(f"      CPU (cores): servers {cpu.server:.2f}, clients {L['client_cpu']:.2f}, postgres {cpu.pg:.2f}, "
              f"whole machine {cpu.machine:.2f} of {os.cpu_count()}", flush=True)

        # --- restart, then the whole fleet registers again at once
        schema = a.schema
        a.owns_schema = False
        a.stop()
        a2 = ServerProcess("postgres", workdir / "a", workdir / "server-a2.log", args.server_launcher,
                           extra=a_extra, schema=schema)
        a2.owns_schema = True
        clients.run("retarget", 30, url=a2.url)
        S = res["storm"] = _storm_phase(clients, a2, n, args)
        five, bad_ra = S["5xx"], S["503_without_retry_after"]
        res["meets_target"] = bool(L["wake_p99_ms"] < 250 and not L["not_woken"] and L["rate"] >= 0.98 * L["offered"]
                                   and L["hold_over_p99_ms"] < TARGET_P99_MS and S["registered"] == n
                                   and S["all_registered_s"] <= 60
                                   and all(k.endswith(" 503") for k in five) and not bad_ra)
        print(f"   fleet targets (wake p99 < 250 ms, every write woken, heartbeats at the offered rate with p99 < "
              f"{TARGET_P99_MS:.0f} ms beyond the hold, all re-registered within 60 s, no 5xx but 503 + "
              f"Retry-After): {'met' if res['meets_target'] else 'MISSED'}", flush=True)
        return res
    finally:
        _teardown(clients, b, a2, a)


def _teardown(clients: Clients | None, *started: ServerProcess | None) -> None:
    """Stop the client processes, then every server started (one failing to stop does not keep the others up)."""
    if clients is not None:
        clients.close()
    for srv in started:
        if srv is not None:
            try:
                srv.stop()
            except Exception as e:  # pragma: no cover - stopping the others matters more
                print(f"   ! stopping a server: {e}", file=sys.stderr)


def _storm_phase(clients: Clients, server: ServerProcess, n: int, args, profile: Path | None = None) -> dict:
    """Every device registers again at once (the restart's storm), against `server`; prints and returns the figures.
    `profile`: py-spy the server meanwhile into that file (for the whole of --storm-limit at most)."""
    prof = _profile_start(server.pid, args.storm_limit, profile) if profile else None
    t0 = time.time()
    with CpuWatch(server.pid, True) as cpu:
        st = clients.run("storm", args.storm_limit + 60, spread=args.storm_spread, time_limit=args.storm_limit)
    if prof is not None:
        prof.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        try:
            prof.wait(30)
        except subprocess.TimeoutExpired:
            prof.kill()
    done = sorted(t for r in st for t in r["done"])
    statuses: Counter = Counter()
    bad_ra: Counter = Counter()
    for r in st:
        statuses.update(r["statuses"])
        bad_ra.update(r["bad_retry_after"])
    all_s = done[-1] - t0 if len(done) == n else float("nan")
    five = {k: v for k, v in statuses.items() if k.split()[-1].startswith("5")}
    S = {"registered": len(done), "all_registered_s": all_s, "spread_s": args.storm_spread,
         "rate": len(done) / max(1e-9, (done[-1] - done[0])) if len(done) > 1 else 0.0,
         "statuses": dict(statuses), "5xx": five, "503_without_retry_after": dict(bad_ra),
         "server_cpu": cpu.server, "pg_cpu": cpu.pg, "machine_busy": cpu.machine,
         "server_ms_per_registration": cpu.server * cpu.wall / max(1, len(done)) * 1000,
         "pg_ms_per_registration": cpu.pg * cpu.wall / max(1, len(done)) * 1000}
    print(f"   re-registration storm after a restart (devices start within {args.storm_spread:g} s): "
          f"{S['registered']}/{n} registered, all within {S['all_registered_s']:.1f} s, "
          f"{S['rate']:.0f} registrations/s (first to last)")
    print(f"      answers: {dict(sorted(statuses.items()))}; 503 without Retry-After: {dict(bad_ra) or 0}")
    print(f"      CPU (cores): server {cpu.server:.2f}, postgres {cpu.pg:.2f}, whole machine "
          f"{cpu.machine:.2f} of {os.cpu_count()}; per registration: server {S['server_ms_per_registration']:.1f} ms, "
          f"postgres {S['pg_ms_per_registration']:.1f} ms; load avg {os.getloadavg()[0]:.1f}", flush=True)
    if profile is not None:
        S["profile"] = _profile_report(profile, top=30)
        print("\n".join(S["profile"]), flush=True)
    return S


def run_storm(args, workdir: Path) -> dict:
    """The re-registration storm alone (PostgreSQL): the fleet registers once, then, --storm-rounds times, the control
    plane restarts and every device registers again at once. With --ab-launcher the restarts alternate between the
    tree under test (A: this tree, or --server-launcher) and B, on the same schema and devices: an A/B in one
    session, each round moments from the other."""
    n = args.devices
    extra = ("--workers", str(args.fleet_workers), "--ttl-slack", "900")
    launchers = [("A", args.server_launcher)] + ([("B", args.ab_launcher)] if args.ab_launcher else [])
    print(f"\n== storm: {n} devices, {args.storm_rounds} restart(s), {args.fleet_workers} worker process(es), "
          f"PostgreSQL; " + ", ".join(f"{k}: {v or 'this tree'}" for k, v in launchers), flush=True)
    srv = ServerProcess("postgres", workdir / "s", workdir / "server-0.log", args.server_launcher, extra=extra)
    schema, clients = srv.schema, None
    res: dict = {"backend": "postgres", "scenario": "storm", "devices": n, "rounds": []}
    try:
        clients = Clients(args.client_procs, srv, [f"storm-{i:06d}" for i in range(n)], args.timeout)
        reg, res["register"] = _register_phase(clients, srv, True, args,
                                               f"first registration ({args.register_concurrency} in flight)")
        if reg["ok"] < n:
            raise RuntimeError(f"only {reg['ok']} of {n} devices registered: {dict(reg['errors'])}")
        for i in range(args.storm_rounds):
            label, launcher = launchers[i % len(launchers)]
            srv.owns_schema = False
            srv.stop()
            srv = ServerProcess("postgres", workdir / "s", workdir / f"server-{i + 1}.log", launcher, extra=extra,
                                schema=schema)
            srv.owns_schema = True
            clients.run("retarget", 30, url=srv.url)
            print(f"   round {i + 1}, {label} (pid {srv.pid}):", flush=True)
            prof = Path(args.profile) / f"storm-{label}-{i + 1}.txt" if args.profile else None
            if prof is not None:
                prof.parent.mkdir(parents=True, exist_ok=True)
            res["rounds"].append({"label": label, **_storm_phase(clients, srv, n, args, prof)})
        for label in sorted({r["label"] for r in res["rounds"]}):
            rs = [r for r in res["rounds"] if r["label"] == label]
            figures = [(key, ", ".join(format(r[key], fmt) for r in rs)) for key, fmt in
                       (("rate", ".0f"), ("all_registered_s", ".1f"), ("server_ms_per_registration", ".1f"))]
            print(f"   {label}: " + "; ".join(f"{k} {v}" for k, v in figures), flush=True)
        return res
    finally:
        _teardown(clients, srv)


#: server counters printed per phase (deltas): they say which path the requests took
_COUNTERS = ("picoiot_version_cache_misses_total", "picoiot_token_verifications",
             "picoiot_device_offline_transitions_total", "picoiot_overload_rejections_total",
             "picoiot_heartbeats_total")


def _counters(url: str) -> dict[str, float]:
    """Sums of the _COUNTERS samples on the server's /metrics (one worker's view with --workers N)."""
    import httpx
    out = dict.fromkeys(_COUNTERS, 0.0)
    try:
        text = httpx.get(f"{url}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def _counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("picoiot_"): after[k] - before[k] for k in _COUNTERS}


def _print_delta(delta: dict[str, float]) -> None:
    print("      server counters: " + ", ".join(f"{k} +{v:.0f}" for k, v in delta.items()), flush=True)


def _print_counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = _counter_delta(before, after)
    _print_delta(delta)
    return delta


def _settle(url: str, limit_s: float = 60.0) -> bool:
    """Wait (bounded) until the server answers /health within a second: the previous phase's backlog is drained."""
    import httpx
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"   ! the server did not recover within {limit_s:.0f} s")
    return False


def _print_phase(name: str, r: dict, unit: str) -> None:
    err = sum(r["errors"].values())
    print(f"   {name}: {r['rate']:.0f} {unit}, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
          f"errors {err}{' ' + str(dict(list(r['errors'].items())[:3])) if err else ''}", flush=True)
    print(f"      CPU (cores): server {r['server_cpu']:.2f}, clients {r['client_cpu']:.2f}"
          + (f", postgres {r['pg_cpu']:.2f}" if r.get("pg_cpu") else "")
          + f", whole machine {r['machine_busy']:.2f} of {os.cpu_count()}", flush=True)


def _summary(results: list[dict], args) -> None:
    print("\n== summary (" + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", {os.cpu_count()} CPUs)")
    print(f"{'db':<9}{'devices':>8}{'hb/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'no-op/s':>9}{'hb cap/s':>10}"
          f"{'ratio':>7}  target (≥{TARGET_RATE:.0f}/s, p99<{TARGET_P99_MS:.0f} ms, ratio≥{TARGET_RATIO})")
    for r in results:
        if "sustained" not in r:
            continue
        s = r["sustained"]
        print(f"{r['backend']:<9}{r['register']['ok']:>8}{s['rate']:>9.0f}{s['p50_ms']:>8.1f}{s['p99_ms']:>8.1f}"
              f"{r['capacity_health']['rate']:>9.0f}{r['capacity_heartbeat']['rate']:>10.0f}{r['ratio']:>7.2f}  "
              + ("met" if r["meets_target"] else "MISSED"))
        low = r.get("sustained_at_60pct_capacity")
        if low:
            print(f"{'':<9}{low['devices']:>8}{low['rate']:>9.0f}{low['p50_ms']:>8.1f}{low['p99_ms']:>8.1f}"
                  f"{'':>26}  (sustained at 60% of the measured heartbeat capacity)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20000)
    ap.add_argument("--interval", type=float, default=10.0, help="heartbeat interval per device, seconds")
    ap.add_argument("--duration", type=float, default=30.0, help="sustained-phase measurement window, seconds")
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--capacity-duration", type=float, default=4.0,
                    help="seconds per capacity round and kind")
    ap.add_argument("--capacity-rounds", type=int, default=5,
                    help="capacity rounds; each runs /health then heartbeats; the ratio is the median of the rounds'")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight in the capacity phase")
    ap.add_argument("--keepalive", action="store_true",
                    help="capacity phase on persistent connections (devices themselves always close)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes generating the load")
    ap.add_argument("--register-concurrency", type=int, default=32)
    ap.add_argument("--register-timeout", type=float, default=600.0, help="cap on the registration phase, seconds")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the server during the heartbeat capacity phase")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--scenario", choices=["load", "fleet", "storm"], default="load",
                    help="load: register, capacity, sustained heartbeats (above); fleet: held long-polls woken by an "
                         "operator on a second process, then a restart and the re-registration storm (PostgreSQL); "
                         "storm: only restarts and their re-registration storms (--storm-rounds, --ab-launcher)")
    ap.add_argument("--fleet-workers", type=int, default=2, help="fleet: server worker processes holding the polls")
    ap.add_argument("--fleet-writes", type=float, default=20.0, help="fleet: operator writes per second")
    ap.add_argument("--storm-spread", type=float, default=10.0,
                    help="fleet: the devices start re-registering within this many seconds of the restart")
    ap.add_argument("--storm-limit", type=float, default=300.0, help="fleet, storm: cap on one storm, seconds")
    ap.add_argument("--storm-rounds", type=int, default=1, help="storm: restarts, each followed by a storm")
    ap.add_argument("--ab-launcher", metavar="SCRIPT",
                    help="storm: every other restart runs this launcher (B) instead of the tree under test (A)")
    ap.add_argument("--server-launcher", metavar="SCRIPT",
                    help="run this Python script instead of `-m picoiot.cli` (same arguments): A/B-test a patch")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.interval <= 0 or args.duration <= 0 or args.client_procs < 1:
        ap.error("--devices, --interval, --duration and --client-procs must be positive")
    backends = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(f"controlplane_load: {args.devices} devices, heartbeat every {args.interval:g} s "
          f"(offered {args.devices / args.interval:.0f}/s), window {args.duration:g} s, "
          f"{args.client_procs} client process(es), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="picoiot-bench-"))
    if args.scenario in ("fleet", "storm"):
        try:
            results.append((run_fleet if args.scenario == "fleet" else run_storm)(args, workdir))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as e:
            print(f"   ! {args.scenario}: {e}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        return 0 if results else 1
    try:
        for backend in backends:
            try:
                results.append(run_backend(backend, args, workdir))
            except RuntimeError as e:  # one backend failing must not lose the other's figures
                print(f"   ! {backend}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _summary(results, args)
    if args.json:
        for r in results:
            r["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            r["argv"] = sys.argv
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
