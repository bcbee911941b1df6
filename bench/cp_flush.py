#!/usr/bin/env python3
"""CPU time of the once-a-second `last_seen` flush (server/liveness.py `_flush_rows`) for N devices, beside the way
it was written before (one `json.dumps` over the rows as objects, then the same kind of statement), same run.

    .venv/bin/python bench/cp_flush.py                 # --rows 2000 --rounds 5 --db both

Why CPU and not wall time: the flush runs on a worker thread that shares the GIL with the event loop, so its *Python*
CPU is what heartbeats wait behind; the database's own work happens in another process (PostgreSQL) or with the GIL
released (SQLite's C code). Printed per database: the flush thread's CPU per round (median), split into preparing the
parameters and executing, and the wall time. PostgreSQL: a fresh schema in $PICOIOT_BENCH_PG / $PICOIOT_TEST_PG
(default postgresql://postgres@127.0.0.1:5432/test), dropped afterwards; SQLite: a temporary file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from picoiot.server import db as tables  # noqa: E402
from picoiot.server import liveness  # noqa: E402
from picoiot.server.models import HeartbeatIn  # noqa: E402

PG_URL = os.environ.get("PICOIOT_BENCH_PG") or os.environ.get("PICOIOT_TEST_PG") or \
    "postgresql://postgres@127.0.0.1:5432/test"
_HB = (b'{"seq":%d,"uptime":%d,"mem_free":81234,"rssi":-61,"reconnects":0,"firmware":"0.1.0",'
       b'"config_version":1,"state_version":1}')

# the statement as it was before 2026-12-01 (one JSON document of row objects)
_OLD_PG = ("UPDATE devices AS d SET last_seen = v.ts, heartbeat = v.hb "
           "FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(ns text, dev text, ts bigint, hb jsonb) "
           "WHERE d.ns = v.ns AND d.device_id = v.dev AND (d.last_seen IS NULL OR d.last_seen < v.ts)")


def _old_flush(conn, batch: dict) -> None:
    if conn.dialect.name == "postgresql":
        doc = json.dumps([{"ns": ns, "dev": dev, "ts": ts, "hb": hb} for (ns, dev), (ts, hb) in batch.items()])
        conn.exec_driver_sql(_OLD_PG, {"rows": doc})
    else:
        conn.exec_driver_sql(liveness._FLUSH_SQLITE, [(ts, json.dumps(hb), ns, dev, ts)
                                                      for (ns, dev), (ts, hb) in batch.items()])


def _engine(db: str, tmp: Path) -> tuple[sa.Engine, str | None]:
    if db == "sqlite":
        return sa.create_engine(f"sqlite:///{tmp / 'flush.db'}"), None
    schema = f"bench_flush_{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                           connect_args={"options": f"-csearch_path={schema}"})
    with eng.begin() as c:
        c.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    return eng, schema


def run(db: str, rows: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cp-flush-"))
    eng, schema = _engine(db, tmp)
    try:
        with eng.begin() as c:  # the server's own devices table, as its migrations create it
            tables.devices.create(c)
            c.execute(tables.devices.insert(), [
                {"ns": "default", "device_id": f"dev-{i:06d}", "created_ts": 0, "last_seen": 0, "ttl_s": 35,
                 "capabilities": [], "config_overrides": {}, "config_version": 0, "online": True}
                for i in range(rows)])
        models = [HeartbeatIn.model_validate_json(_HB % (i, i * 10)) for i in range(rows)]
        figures: dict[str, list[tuple[float, float, float]]] = {"before": [], "now": []}
        base = int(time.time() * 1000)
        for r in range(rounds):
            for how in ("before", "now"):
                ts = base + 2 * r + (how == "now")
                t0 = time.thread_time()
                if how == "before":  # the heartbeats as dicts (model_dump on arrival), serialised by the flush
                    batch = {("default", f"dev-{i:06d}"): (ts, m.model_dump(exclude_none=True))
                             for i, m in enumerate(models)}
                    fn = _old_flush
                else:  # as JSON text (model_dump_json on arrival)
                    batch = {("default", f"dev-{i:06d}"): liveness.Beat(ts, m.model_dump_json(exclude_none=True))
                             for i, m in enumerate(models)}
                    fn = liveness._flush_rows
                t1 = time.thread_time()  # the per-heartbeat serialisation is spread over the event loop: not counted
                w0 = time.perf_counter()
                with eng.begin() as c:
                    fn(c, batch)
                figures[how].append((time.thread_time() - t1, time.perf_counter() - w0, t1 - t0))
        with eng.connect() as c:
            n = c.exec_driver_sql("SELECT count(*) FROM devices WHERE last_seen = "
                                  f"{base + 2 * (rounds - 1) + 1}").scalar()
        if n != rows:
            raise SystemExit(f"{db}: the last flush wrote {n} of {rows} rows")
        print(f"{db}: {rows} rows, {rounds} rounds (median)")
        for how, fs in figures.items():
            cpu = statistics.median(f[0] for f in fs) * 1000
            wall = statistics.median(f[1] for f in fs) * 1000
            prep = statistics.median(f[2] for f in fs) / rows * 1e6
            print(f"  {how:<7} flush thread CPU {cpu:6.1f} ms   wall {wall:6.1f} ms   "
                  f"(building the batch, incl. each heartbeat's serialisation: {prep:.1f} µs per row; in the server that is done on arrival)")
    finally:
        if schema:
            with eng.begin() as c:
                c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        eng.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    args = ap.parse_args(argv)
    for db in (("sqlite", "postgres") if args.db == "both" else (args.db,)):
        run(db, args.rows, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
