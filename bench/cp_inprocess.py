#!/usr/bin/env python3
"""In-process cost of the control plane's hottest requests: the ASGI app called directly, no sockets, no uvicorn.

    .venv/bin/python bench/cp_inprocess.py                       # --devices 2000 --calls 20000
    .venv/bin/python bench/cp_inprocess.py --profile 25          # and the top 25 functions (cProfile) of the heartbeats

What it separates: over real sockets a heartbeat and `/health` both carry uvicorn's connection handling and the
kernel's loopback work (most of their cost, docs/benchmarks.md); called in-process, what is left is the app's own work
per request — the fast path (`server/hotpath.py`), the recording, the answer, the metrics. Heartbeats go to random
devices out of --devices (as the load bench's capacity phase sends them), each with its own token. Printed: process
CPU µs per call for `/health`, a heartbeat, and their ratio, median of --rounds. SQLite in a temporary directory
(the database is touched only by the once-a-second flush, which runs as in the server).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from picoiot.server import Settings, create_app  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from picoiot.server import db as tables  # noqa: E402
from picoiot.server.app import refreeze_if_grown  # noqa: E402
from picoiot.server.auth import derive_device_key, issue_token, registration_signature  # noqa: E402
from picoiot.server.settings import SecretStore  # noqa: E402


async def _register(client: httpx.AsyncClient, enrollment_key: str, dev: str) -> str:
    nonce = (await client.post("/api/devices/challenge", json={"device_id": dev})).json()["nonce"]
    r = await client.post("/api/devices/register", json={
        "device_id": dev, "nonce": nonce, "signature": registration_signature(derive_device_key(enrollment_key, dev), nonce, dev),
        "firmware": "0.1.0", "device_type": "relays"})
    r.raise_for_status()
    return r.json()["token"]


def _clone(cp, template: str, devs: list[str], tokens: dict[str, str]) -> None:
    """What registering each of devs would leave behind, copied from the registered device `template`."""
    d = tables.devices
    with cp.db.engine.begin() as conn:
        row = dict(conn.execute(sa.select(d).where(d.c.device_id == template)).mappings().one())
        if devs:
            conn.execute(d.insert(), [{**row, "device_id": dev} for dev in devs])
    entry = cp.versions.get(row["ns"], template)
    key = cp.settings.secrets.signing_key
    for dev in devs:
        tokens[dev] = issue_token(key, dev, row["ns"], "device", cp.settings.token_ttl_s)
        cp.tokens.principal(key, tokens[dev])
        cp.versions.put(row["ns"], dev, entry.config_version, entry.state_version, entry.ttl_s)
        cp.liveness.known_online(row["ns"], dev)


class _Call:
    """One prepared ASGI request, replayable without allocating anything but what the app allocates."""

    def __init__(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""):
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                      "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                      "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
                      "server": ("127.0.0.1", 8000), "state": {}}
        self.message = {"type": "http.request", "body": body, "more_body": False}
        self.status = 0

    async def receive(self):
        return self.message

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]


async def _run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cp-inproc-"))
    secrets = SecretStore(tmp / "secrets.json")
    settings = Settings(db_url=f"sqlite:///{tmp / 'cp.db'}", secrets=secrets, data_dir=tmp)
    app = create_app(settings)
    ekey = secrets.enrollment_key("default")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
            devs = [f"inproc-{i}" for i in range(args.devices)]
            tokens = {}
            real = devs[:max(1, min(args.register, len(devs)))]
            for i in range(0, len(real), 50):
                chunk = real[i:i + 50]
                for dev, tok in zip(chunk, await asyncio.gather(*(_register(client, ekey, d) for d in chunk))):
                    tokens[dev] = tok
        _clone(app.state.cp, real[0], devs[len(real):], tokens)
        refreeze_if_grown(app.state.cp)
        rnd = random.Random(1)
        health = _Call("GET", "/health", [(b"host", b"cp")])

        def heartbeat(seq: int) -> _Call:
            dev = devs[rnd.randrange(len(devs))]
            body = (b'{"seq":%d,"uptime":%d,"mem_free":81234,"rssi":-61,"reconnects":0,"firmware":"0.1.0",'
                    b'"config_version":1,"state_version":1}' % (seq, seq * 10))
            return _Call("POST", f"/api/v1/devices/{dev}/heartbeat",
                         [(b"host", b"cp"), (b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()),
                          (b"authorization", b"Bearer " + tokens[dev].encode()), (b"connection", b"close")], body)

        async def measure(calls: list[_Call]) -> float:
            await asyncio.sleep(0)
            t0 = time.process_time()
            for c in calls:
                await app(c.scope, c.receive, c.send)
            cpu = time.process_time() - t0
            bad = [c.status for c in calls if c.status != 200]
            if bad:
                raise SystemExit(f"unexpected answers: {bad[:5]} ({len(bad)} of {len(calls)})")
            return cpu / len(calls) * 1e6

        gc.collect()
        gc.freeze()
        figures: dict[str, list[float]] = {"health": [], "heartbeat": []}
        seq = 0
        for _ in range(args.rounds):
            figures["health"].append(await measure([health] * args.calls))
            calls = [heartbeat(seq + i) for i in range(args.calls)]
            seq += args.calls
            figures["heartbeat"].append(await measure(calls))
        h, b = statistics.median(figures["health"]), statistics.median(figures["heartbeat"])
        print(f"cp_inprocess: {args.devices} devices, {args.calls} calls × {args.rounds} rounds, "
              f"Python {sys.version.split()[0]}")
        print(f"  /health    {h:7.1f} µs CPU per call   (rounds: {', '.join(f'{x:.1f}' for x in figures['health'])})")
        print(f"  heartbeat  {b:7.1f} µs CPU per call   (rounds: {', '.join(f'{x:.1f}' for x in figures['heartbeat'])})")
        print(f"  ratio /health ÷ heartbeat: {h / b:.2f}")
        if args.profile:
            calls = [heartbeat(seq + i) for i in range(args.calls)]
            prof = cProfile.Profile()
            prof.enable()
            await measure(calls)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
            print(out.getvalue())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--register", type=int, default=50, help="devices registered for real; the rest are copies")
    ap.add_argument("--calls", type=int, default=20000, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions of a heartbeat round")
    return asyncio.run(_run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
