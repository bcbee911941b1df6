"""Telemetry ingest beside the heartbeat path, and the 7-day chart query, on a real `picoiot server` process.

    .venv/bin/python bench/telemetry.py [--db sqlite|postgres|both] [--devices 200] [--hb-rate 200]
                                        [--rate 20000] [--batch 500] [--senders 4] [--seconds 15]

For each database, in one run:
  1. baseline: heartbeats alone (`--devices` devices, `--hb-rate` heartbeats/s in all) → heartbeat p50/p99;
  2. the same heartbeats while `--senders` clients offer `--rate` readings/s in all, in batches of `--batch` (open
     loop, each from its own devices, within the per-device rate limit) → readings accepted/s, readings written/s
     (all accepted readings ÷ the time until the last of them was written: the flush keeping up or not),
     heartbeat p50/p99 beside the baseline;
  3. a chart query: 7 days of one field as 1-minute aggregates (10,080 rows, written straight into the table),
     asked the way the dashboard asks (`since` = now − 7 d, default step), 30 times → p50/p99, beside a one-device
     read (`GET …/devices/{id}`) in the same run.
Clients run in their own processes (the load must not share the measuring process's CPU). Targets (issue 14):
20,000 readings/s on PostgreSQL with heartbeat p99 < 100 ms; the chart query < 100 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from controlplane_load import HttpError, _call, _request  # noqa: E402  (the raw-socket client of that benchmark)
from picoiot.procs import ServerChild  # noqa: E402
from picoiot.server.auth import derive_device_key, issue_token  # noqa: E402
from picoiot.server.settings import Settings  # noqa: E402

PG = os.environ.get("PICOIOT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


async def _register(url: str, enrollment: str, ids: list[str]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        sem = asyncio.Semaphore(16)

        async def one(dev: str) -> None:
            async with sem:
                n = (await c.post("/api/devices/challenge", json={"device_id": dev})).json()["nonce"]
                key = derive_device_key(enrollment, dev)
                sig = hmac.new(key.encode(), f"{n}|{dev}".encode(), hashlib.sha256).hexdigest()
                r = await c.post("/api/devices/register", json={"device_id": dev, "nonce": n, "signature": sig,
                                                                "device_type": "sensors"})
                tokens[dev] = r.json()["token"]
        await asyncio.gather(*(one(d) for d in ids))
    return tokens


def heartbeat_client(url: str, tokens: dict[str, str], rate: float, seconds: float, out) -> None:
    """Each device beats at rate/len(tokens) Hz, one connection per heartbeat (what a device does), on the raw
    asyncio client of bench/controlplane_load.py (httpx's own CPU cost would be measured instead); latency in ms."""
    host, port = url.removeprefix("http://").split(":")

    async def main():
        lat: list[float] = []
        errors = 0
        per = len(tokens) / rate
        end = time.monotonic() + seconds

        async def device(i: int, dev: str, tok: str) -> None:
            nonlocal errors
            await asyncio.sleep(per * i / len(tokens))
            seq = 0
            nxt = time.monotonic()
            while nxt < end:
                seq += 1
                req = _request("POST", host, f"/api/v1/devices/{dev}/heartbeat",
                               json.dumps({"seq": seq, "uptime": seq}).encode(), tok)
                t0 = time.perf_counter()
                try:
                    status, _ = await _call(host, int(port), req, 10)
                    errors += status != 200
                except HttpError:
                    errors += 1
                lat.append((time.perf_counter() - t0) * 1000)
                nxt += per
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
        await asyncio.gather(*(device(i, d, t) for i, (d, t) in enumerate(tokens.items())))
        out.put({"lat": lat, "errors": errors})
    asyncio.run(main())


def telemetry_client(url: str, tokens: dict[str, str], batch: int, rate: float, seconds: float, out) -> None:
    """Open loop: a batch every batch/rate seconds from the next device, whatever the answers (a fleet does not
    wait for the server); a refused batch is counted, not retried."""
    async def main():
        accepted = refused = 0
        codes: dict[int, int] = {}
        devs = list(tokens.items())
        every = batch / rate
        host, port = url.removeprefix("http://").split(":")

        async def send(dev: str, tok: str, body: bytes) -> None:
            nonlocal accepted, refused
            try:
                code, _ = await _call(host, int(port), _request("POST", host, f"/api/v1/devices/{dev}/telemetry",
                                                                body, tok), 30)
            except HttpError:
                code = 0
            codes[code] = codes.get(code, 0) + 1
            if code == 202:
                accepted += batch
            else:
                refused += batch
        tasks = []
        start = time.monotonic()
        i = 0
        while (t := start + i * every) < start + seconds:
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            dev, tok = devs[i % len(devs)]
            now = int(time.time() * 1000)
            body = json.dumps({"readings": [["temp", now - k, 20.0 + (k % 50) / 10] for k in range(batch)]}).encode()
            tasks.append(asyncio.create_task(send(dev, tok, body)))
            i += 1
        await asyncio.gather(*tasks)
        out.put({"accepted": accepted, "refused": refused, "codes": codes, "offered": i * batch})
    asyncio.run(main())


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def run(backend: str, a) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    schema = f"bench_tm_{uuid.uuid4().hex[:8]}" if backend == "postgres" else None
    extra = ("--db-schema", schema) if schema else ()
    server = ServerChild(work, db=PG if backend == "postgres" else None, extra=extra, log=work / "server.log")
    server.start(60)
    url = server.url
    try:
        settings = Settings.from_data_dir(work, db_url=PG if schema else None, db_schema=schema)
        enrollment = settings.secrets.enrollment_key("default")
        hb_ids = [f"hb-{i:04d}" for i in range(a.devices)]
        tm_ids = [f"tm-{i:04d}" for i in range(a.senders * 50)]  # 50 devices per sender: under the per-device rate
        hb_tokens = asyncio.run(_register(url, enrollment, hb_ids))
        tm_tokens = asyncio.run(_register(url, enrollment, tm_ids))
        time.sleep(2)
        ctx = mp.get_context("spawn")

        def phase(with_telemetry: bool) -> dict:
            q = ctx.Queue()
            procs = [ctx.Process(target=heartbeat_client, args=(url, hb_tokens, a.hb_rate, a.seconds, q))]
            if with_telemetry:
                chunks = [dict(list(tm_tokens.items())[i::a.senders]) for i in range(a.senders)]
                procs += [ctx.Process(target=telemetry_client, args=(url, ch, a.batch, a.rate / a.senders,
                                                                     a.seconds, q))
                          for ch in chunks]
            flushed0 = metric(url, "picoiot_telemetry_flushed_readings_total")
            t0 = time.monotonic()
            for p in procs:
                p.start()
            results = [q.get(timeout=a.seconds + 120) for _ in procs]
            for p in procs:
                p.join()
            hb = next(r for r in results if "lat" in r)
            tm = [r for r in results if "accepted" in r]
            accepted = sum(r["accepted"] for r in tm)
            # written/s = everything accepted ÷ the time until the last of it was in the database
            deadline = time.monotonic() + 120
            while (metric(url, "picoiot_telemetry_flushed_readings_total") - flushed0 < accepted
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            drained = time.monotonic() - t0
            codes: dict[str, int] = {}
            for r in tm:
                for k, v in r["codes"].items():
                    codes[str(k)] = codes.get(str(k), 0) + v
            return {"heartbeats": len(hb["lat"]), "hb_errors": hb["errors"],
                    "hb_p50_ms": round(pct(hb["lat"], 50), 1), "hb_p99_ms": round(pct(hb["lat"], 99), 1),
                    "readings_offered_per_s": round(sum(r["offered"] for r in tm) / a.seconds),
                    "readings_accepted_per_s": round(sum(r["accepted"] for r in tm) / a.seconds),
                    "readings_written_per_s": round((metric(url, "picoiot_telemetry_flushed_readings_total")
                                                     - flushed0) / drained),
                    "all_written_after_s": round(drained, 1),
                    "telemetry_codes": codes}

        base = phase(False)
        load = phase(True)
        chart = chart_query(url, settings, schema)
        return {"backend": backend, "baseline_heartbeats_only": base, "with_telemetry": load, "chart": chart}
    finally:
        server.stop()
        if schema:
            eng = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://", 1))
            with eng.begin() as c:
                c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            eng.dispose()


def chart_query(url: str, settings: Settings, schema: str | None) -> dict:
    from picoiot.server import db as tables
    from picoiot.server.db import make_engine
    eng = make_engine(settings)
    now = int(time.time() * 1000)
    start = now - now % 60_000 - 7 * 86400_000
    rows = [{"ns": "default", "device_id": "tm-0000", "field": "chart", "bucket": start + i * 60_000,
             "vmin": 1.0, "vmax": 3.0, "vsum": 2.0 * 60, "n": 60} for i in range(7 * 1440)]
    with eng.begin() as c:
        c.execute(tables.telemetry_1m.insert(), rows)
    eng.dispose()
    tok = issue_token(settings.secrets.signing_key, "bench", "default", "viewer", 600)
    h = {"Authorization": f"Bearer {tok}"}
    chart, plain = [], []
    points = 0
    with httpx.Client(base_url=url, headers=h, timeout=10) as c:
        for i in range(33):
            t0 = time.perf_counter()
            r = c.get("/api/v1/namespaces/default/devices/tm-0000/telemetry",
                      params={"field": "chart", "since": int(time.time() * 1000) - 7 * 86400_000})
            t1 = time.perf_counter()
            c.get("/api/v1/namespaces/default/devices/tm-0000")
            t2 = time.perf_counter()
            assert r.status_code == 200, r.text
            points = len(r.json()["points"])
            if i >= 3:  # warm-up
                chart.append((t1 - t0) * 1000)
                plain.append((t2 - t1) * 1000)
    return {"rows_scanned": 7 * 1440, "points_returned": points,
            "chart_p50_ms": round(statistics.median(chart), 1), "chart_p99_ms": round(pct(chart, 99), 1),
            "baseline_get_device_p50_ms": round(statistics.median(plain), 1),
            "baseline_get_device_p99_ms": round(pct(plain, 99), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--devices", type=int, default=200, help="heartbeating devices")
    ap.add_argument("--hb-rate", type=float, default=200, help="heartbeats/s in all")
    ap.add_argument("--rate", type=float, default=20_000, help="readings/s offered in all")
    ap.add_argument("--batch", type=int, default=500, help="readings per telemetry request")
    ap.add_argument("--senders", type=int, default=4, help="telemetry client processes")
    ap.add_argument("--seconds", type=float, default=15)
    a = ap.parse_args()
    for backend in (["sqlite", "postgres"] if a.db == "both" else [a.db]):
        print(json.dumps(run(backend, a)), flush=True)


if __name__ == "__main__":
    main()
