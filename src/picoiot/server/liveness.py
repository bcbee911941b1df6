"""Heartbeat bookkeeping: last_seen kept in memory and written in batches; TTL sweep → offline + alarm.

Why in memory: a heartbeat is the hottest call (20,000 devices at 10 s = 2,000/s). Writing `last_seen` for each one
would make the database the bottleneck, so a heartbeat from a device known to be online only touches a dict, and
`flush()` writes all of them with one executemany every `heartbeat_flush_s`. What must not be lost is written at once:
the offline→online transition (and the alarm it resolves) goes to the database before the heartbeat is answered.
The sweep runs in SQL against the flushed `last_seen`, so several processes sharing one PostgreSQL agree on who is
offline, and `UPDATE … RETURNING` hands each offline device to exactly one sweeper.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa

from . import changes
from .changes import Events
from . import alarms as alarm_store
from . import db as tables
from .db import now_ms
from .plane import Plane

log = logging.getLogger("picoiot.server")

OFFLINE_KEY = "device_offline"


def mark_alive(conn: sa.Connection, events: Events, cp: Plane, ns: str, dev: str, ts: int,
               hb: str | None) -> bool:
    """Write last_seen; if the device was offline, mark it online and resolve its offline alarm. False = no device."""
    d = tables.devices
    values: dict[str, Any] = {"online": True, "last_seen": ts}
    if hb is not None:
        values["heartbeat"] = json.loads(hb)
    where = (d.c.ns == ns, d.c.device_id == dev)
    came_back = conn.execute(d.update().where(*where, d.c.online.is_(False)).values(**values)).rowcount
    if came_back:
        alarm_store.resolve_server_alarm(conn, ns, dev, OFFLINE_KEY, ts)
        events.emit(conn, changes.online(ns, dev))
        return True
    return conn.execute(d.update().where(*where).values(**values)).rowcount == 1


class Beat:
    """A heartbeat this process holds until the flush writes it: when it arrived (ms since the epoch) and the
    heartbeat as JSON text, serialised on arrival so that the flush only joins strings. One per device heard from
    since the last flush (2,000+ at fleet scale), hence the slots."""

    __slots__ = ("last_seen", "heartbeat")

    def __init__(self, last_seen: int, heartbeat: str | None) -> None:
        self.last_seen = last_seen
        self.heartbeat = heartbeat

    def decoded(self) -> dict | None:
        """The heartbeat as a document (operators' reads overlay it on the stored row)."""
        return None if self.heartbeat is None else json.loads(self.heartbeat)


_FLUSH_PG = (
    "UPDATE devices AS d SET last_seen = v.ts::bigint, heartbeat = NULLIF(v.hb, 'null'::jsonb) "
    "FROM ROWS FROM (jsonb_array_elements_text(%(ns)s::jsonb), jsonb_array_elements_text(%(dev)s::jsonb), "
    "jsonb_array_elements_text(%(ts)s::jsonb), jsonb_array_elements(%(hb)s::jsonb)) AS v(ns, dev, ts, hb) "
    "WHERE d.ns = v.ns AND d.device_id = v.dev AND (d.last_seen IS NULL OR d.last_seen < v.ts::bigint)")
_FLUSH_SQLITE = ("UPDATE devices SET last_seen = ?, heartbeat = ? "
                 "WHERE ns = ? AND device_id = ? AND (last_seen IS NULL OR last_seen < ?)")


def _flush_rows(conn: sa.Connection, batch: dict[tuple[str, str], Beat]) -> None:
    """Write each device's newest (last_seen, heartbeat JSON text); an older last_seen never overwrites a newer one.

    This runs every second with a row per device heard from (2,000+ at fleet scale) on a worker thread that shares
    the GIL with the event loop, so it must cost next to no Python CPU (docs/benchmarks.md, Control plane load):
    SQLAlchemy's per-row bind processing and psycopg's Python array quoting took 20–80 ms per 1,000 rows, and even one
    `json.dumps` over the rows as objects 10–16 ms per 2,000 (bench/cp_flush.py). So the heartbeats arrive serialised (one `model_dump_json` each,
    on arrival), and PostgreSQL gets one UPDATE over four parallel JSON arrays (three flat lists dumped in C, the
    heartbeats joined as text); SQLite gets its C executemany."""
    if conn.dialect.name == "postgresql":
        keys, vals = list(batch), list(batch.values())
        conn.exec_driver_sql(_FLUSH_PG, {"ns": json.dumps([k[0] for k in keys]),
                                         "dev": json.dumps([k[1] for k in keys]),
                                         "ts": json.dumps([b.last_seen for b in vals]),
                                         "hb": "[" + ",".join([b.heartbeat or "null" for b in vals]) + "]"})
    else:
        conn.exec_driver_sql(_FLUSH_SQLITE, [(b.last_seen, b.heartbeat, ns, dev, b.last_seen)
                                             for (ns, dev), b in batch.items()])


def _sweep(conn: sa.Connection, events: Events, cp: Plane, now: int, started: int) -> list[tuple[str, str]]:
    d = tables.devices
    # A device is offline when it was silent for its TTL *and* this server has been up for that TTL: after a server
    # outage the devices get a full TTL to come back before being called offline (consul#3569: false "offline").
    now_, started_ = sa.literal(now, sa.BigInteger), sa.literal(started, sa.BigInteger)
    ttl_ms = sa.cast(d.c.ttl_s, sa.BigInteger) * 1000
    expired = sa.and_(d.c.online.is_(True), d.c.last_seen + ttl_ms < now_, started_ + ttl_ms < now_)
    gone = conn.execute(d.update().where(expired).values(online=False).returning(d.c.ns, d.c.device_id)).all()
    for ns, dev in gone:
        alarm_store.fire_server_alarm(conn, ns, dev, OFFLINE_KEY, "error",
                                      "no heartbeat within the device's TTL", now)
        events.emit(conn, changes.offline(ns, dev))
    return [(ns, dev) for ns, dev in gone]


def _expire_nonces(conn: sa.Connection, now: int) -> None:
    conn.execute(tables.nonces.delete().where(tables.nonces.c.expires_ts < now))


def _gauges(conn: sa.Connection) -> tuple[int, int, int]:
    d, a = tables.devices, tables.alarms
    online = conn.execute(sa.select(sa.func.count()).select_from(d).where(d.c.online.is_(True))).scalar() or 0
    total = conn.execute(sa.select(sa.func.count()).select_from(d)).scalar() or 0
    firing = conn.execute(sa.select(sa.func.count()).select_from(a).where(a.c.state == "firing")).scalar() or 0
    return online, total, firing


class Liveness:
    def __init__(self, cp: Plane):
        self.cp = cp
        self._pending: dict[tuple[str, str], Beat] = {}  # (ns, device) → its newest heartbeat not yet written
        self._flushing: dict[tuple[str, str], Beat] = {}  # being written right now
        self._online: set[tuple[str, str]] = set()  # confirmed online in the database
        self._sweeps = 0
        cp.notifier.add_listener(self._on_event)

    def _on_event(self, e: dict) -> None:
        if e["kind"] == "resync":  # offline events may have been missed: confirm each device once more
            self._online.clear()
        elif e["kind"] == "online" or changes.is_registration(e):
            # committed online (a registration, or a device back from offline) in any process: this one's first
            # heartbeat of the device need not write it again (events arrive in commit order, so a later
            # offline still wins)
            self._online.add((e["ns"], e["dev"]))
        elif e["kind"] in ("offline", "deleted"):
            self._online.discard((e["ns"], e["dev"]))
            if e["kind"] == "deleted":
                self._pending.pop((e["ns"], e["dev"]), None)

    def known_online(self, ns: str, dev: str) -> None:
        self._online.add((ns, dev))

    async def beat(self, ns: str, dev: str, hb: str | None) -> bool:
        """Record a sign of life (`hb`: the heartbeat as a JSON object's text). False if the device no longer exists."""
        ts = now_ms()
        key = (ns, dev)
        if key in self._online and self.cp.settings.heartbeat_flush_s > 0:
            self._pending[key] = Beat(ts, hb)
            return True
        ok = await self.cp.write(mark_alive, self.cp, ns, dev, ts, hb)
        if ok:
            self._online.add(key)
        return ok

    async def flush(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        self._flushing = batch
        try:
            await self.cp.read(_flush_rows, batch)
        except Exception:
            # put them back unless newer beats arrived meanwhile; the next flush retries
            for key, val in batch.items():
                self._pending.setdefault(key, val)
            raise
        finally:
            self._flushing = {}
        return len(batch)

    def unflushed(self, ns: str, dev: str) -> Beat | None:
        """The newest heartbeat not yet in the database, if any (operators' reads overlay it)."""
        return self._pending.get((ns, dev)) or self._flushing.get((ns, dev))

    def unflushed_all(self) -> dict[tuple[str, str], Beat]:
        """Every heartbeat not yet in the database: a device list overlays them, taken before its read because a
        flush may finish meanwhile."""
        return {**self._flushing, **self._pending}

    async def housekeeping(self) -> None:
        """One round: flush, sweep, expire nonces, refresh gauges."""
        cp = self.cp
        await self.flush()
        gone = await cp.write(_sweep, cp, now_ms(), cp.started_ms)
        if gone:
            cp.metrics.offline_transitions.inc(len(gone))
            for ns, dev in gone:
                log.info("device offline: %s/%s", ns, dev)
        self._sweeps += 1
        if self._sweeps % 30 == 1:
            await cp.read(_expire_nonces, now_ms())
        online, total, firing = await cp.read(_gauges)
        cp.metrics.devices_online.set(online)
        cp.metrics.devices_total.set(total)
        cp.metrics.alarms_firing.set(firing)
