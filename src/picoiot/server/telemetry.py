"""Telemetry history: validation, per-device rate limits, a write buffer, retention and downsampling, queries, and
the latest values as bounded Prometheus gauges. Knows no HTTP (the routes are in telemetry_api.py).

Why buffered: readings arrive far more often than anything else (20,000/s is the target on PostgreSQL, next to 2,000
heartbeats/s). One transaction per request would make the database the bottleneck and stall heartbeats behind it, so
a request only validates and appends to a list in memory, and `flush()` writes everything every
`telemetry_flush_s` with one INSERT of the raw rows and one upsert of the 1-minute aggregates, in one transaction.
The aggregates are merged (min of mins, max of maxes, sums and counts added), so several server processes on one
PostgreSQL, and late readings, add up correctly without re-reading the raw table. A clean stop flushes; a crash
loses at most the last `telemetry_flush_s` of readings (the device's heartbeat answers never depended on them).
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Callable

import sqlalchemy as sa
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from . import db as tables
from .db import now_ms
from .plane import Plane
from .refusals import Busy, Invalid, NotFound, Throttled

FIELD_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
BUCKET_MS = 60_000
#: a chart or an API answer holds at most this many points; `step` is raised to fit
MAX_POINTS = 5000
VALUE_MAX = 1e15
R, M = tables.telemetry_raw, tables.telemetry_1m

Reading = tuple[str, int, float]  # (field, ts ms, value)


class Rejected(Exception):
    """One reading that is not storable; `reason` is a metrics label and goes into the 422 body."""

    def __init__(self, reason: str, index: int, message: str):
        super().__init__(message)
        self.reason, self.index, self.message = reason, index, message


def check_reading(i: int, field: Any, ts: Any, value: Any, now: int, oldest: int, skew_ms: int) -> Reading:
    if not isinstance(field, str) or not FIELD_RE.match(field):
        raise Rejected("bad_field", i, "field must be 1-32 of [A-Za-z0-9_.-]")
    if type(value) is bool or not isinstance(value, (int, float)):
        raise Rejected("bad_type", i, "value must be a number")
    if not math.isfinite(value) or abs(value) > VALUE_MAX:
        raise Rejected("not_finite", i, "value must be finite and within ±1e15")
    if type(ts) is not int:
        raise Rejected("bad_type", i, "ts must be an integer (ms since the epoch)")
    if ts > now + skew_ms:
        raise Rejected("future", i, "reading from the future")
    if ts < oldest:
        raise Rejected("too_old", i, "reading older than the raw retention")
    return field, ts, float(value)


class TokenBucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, stamp: float):
        self.tokens, self.stamp = burst, stamp


class Telemetry:
    def __init__(self, cp: Plane):
        self.cp = cp
        st = cp.settings
        self._buf: list[tuple[str, str, str, int, float]] = []
        self._inflight = 0
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        #: (ns, dev, field) → (ts, value): the newest reading seen by this process (gauges, live values)
        self.latest: dict[tuple[str, str, str], tuple[int, float]] = {}
        #: (ns, dev) → its field names (bounded by telemetry_max_fields: a device cannot grow memory, series or rows
        #: by inventing names)
        self.fields: dict[tuple[str, str], set[str]] = {}
        self._gauge_keys: set[tuple[str, str, str]] = set()
        self.series_dropped = 0
        self.listeners: list[Callable[[str, str, dict[str, tuple[int, float]]], None]] = []
        reg = cp.metrics.registry
        self.readings = Counter("picoiot_telemetry_readings", "telemetry readings received, by outcome "
                                "(accepted, or the reason they were refused)", ["outcome"], registry=reg)
        self.flushes = Counter("picoiot_telemetry_flushed_readings", "telemetry readings written to the database",
                               registry=reg)
        self._accepted = self.readings.labels("accepted")
        reg.register(_LatestCollector(self, st.telemetry_gauge_series))

    # ------------------------------------------------------------------ ingest
    def _allow(self, ns: str, dev: str, n: int, now_s: float) -> bool:
        st = self.cp.settings
        b = self._buckets.get((ns, dev))
        if b is None:
            if len(self._buckets) > 100_000:  # bounded: forget idle devices' buckets (they refill anyway)
                self._buckets.clear()
            b = self._buckets[(ns, dev)] = TokenBucket(st.telemetry_burst, now_s)
        b.tokens = min(st.telemetry_burst, b.tokens + (now_s - b.stamp) * st.telemetry_rate)
        b.stamp = now_s
        if b.tokens < n:
            return False
        b.tokens -= n
        return True

    def refuse(self, reason: str, n: int = 1) -> None:
        self.readings.labels(reason).inc(n)

    def ingest(self, ns: str, dev: str, items: list[tuple[Any, Any, Any]], strict: bool = True) -> int:
        """Validate and buffer readings [(field, ts, value)]. strict (the telemetry endpoint): any bad reading
        refuses the whole batch (422), a device over its rate 429, a full buffer 503 — nothing is stored.
        Not strict (readings riding on a heartbeat): bad or excess readings are dropped and counted, and the
        heartbeat goes on. Returns the readings accepted."""
        if not items:
            return 0
        st = self.cp.settings
        now = now_ms()
        oldest, skew = now - st.telemetry_raw_retention_s * 1000, st.telemetry_max_skew_s * 1000
        good: list[Reading] = []
        known = self.fields.get((ns, dev))
        new_fields: set[str] = set()
        for i, (f, ts, v) in enumerate(items):
            try:
                r = check_reading(i, f, ts, v, now, oldest, skew)
                if (known is None or f not in known) and f not in new_fields:
                    if (len(known) if known else 0) + len(new_fields) >= st.telemetry_max_fields:
                        raise Rejected("too_many_fields", i, f"at most {st.telemetry_max_fields} fields per device")
                    new_fields.add(f)
                good.append(r)
            except Rejected as e:
                self.refuse(e.reason)
                if strict:
                    if len(items) > 1:
                        self.refuse("batch_refused", len(items) - 1)
                    raise Invalid("invalid reading", {"index": e.index, "reason": e.reason,
                                                      "message": e.message}) from None
        if not good:
            return 0
        if len(self._buf) + self._inflight + len(good) > st.telemetry_max_buffer:
            self.refuse("overload", len(good))
            if strict:
                raise Busy("telemetry buffer full, retry later", retry_after_s=1)
            return 0
        if not self._allow(ns, dev, len(good), time.monotonic()):
            self.refuse("rate_limited", len(good))
            if strict:
                raise Throttled("too many readings from this device",
                                {"rate_per_s": st.telemetry_rate, "burst": st.telemetry_burst}, retry_after_s=1)
            return 0
        if new_fields:
            self.fields.setdefault((ns, dev), set()).update(new_fields)
        buf, latest = self._buf, self.latest
        changed: dict[str, tuple[int, float]] = {}
        for f, ts, v in good:
            buf.append((ns, dev, f, ts, v))
            key = (ns, dev, f)
            cur = latest.get(key)
            if cur is None or ts >= cur[0]:
                latest[key] = changed[f] = (ts, v)
        self._accepted.inc(len(good))
        if changed:
            for fn in self.listeners:
                fn(ns, dev, changed)
        return len(good)

    def forget(self, ns: str, dev: str) -> None:
        """A deleted device: its gauges and buckets go."""
        self._buckets.pop((ns, dev), None)
        for f in self.fields.pop((ns, dev), ()):
            self.latest.pop((ns, dev, f), None)
            self._gauge_keys.discard((ns, dev, f))

    def latest_of(self, ns: str, dev: str) -> dict[str, tuple[int, float]]:
        out = {}
        for f in self.fields.get((ns, dev), ()):
            v = self.latest.get((ns, dev, f))
            if v is not None:
                out[f] = v
        return out

    # ------------------------------------------------------------------ storage
    async def flush(self) -> int:
        if not self._buf:
            return 0
        batch, self._buf = self._buf, []
        self._inflight = len(batch)  # still counts against telemetry_max_buffer while it is being written
        try:
            await self.cp.write(lambda conn, _events: write_batch(conn, batch))
        except Exception:
            self._buf[:0] = batch  # retried on the next flush (bounded by telemetry_max_buffer)
            raise
        finally:
            self._inflight = 0
        self.flushes.inc(len(batch))
        return len(batch)

    async def expire(self) -> tuple[int, int]:
        st = self.cp.settings
        now = now_ms()
        return await self.cp.write(lambda conn, _e: expire(conn, now - st.telemetry_raw_retention_s * 1000,
                                                           now - st.telemetry_agg_retention_s * 1000))


def aggregate(batch: list[tuple[str, str, str, int, float]]) -> dict[tuple[str, str, str, int], list[float]]:
    """Per (ns, dev, field, minute): [min, max, sum, count] of a batch."""
    out: dict[tuple[str, str, str, int], list[float]] = {}
    for ns, dev, f, ts, v in batch:
        key = (ns, dev, f, ts - ts % BUCKET_MS)
        a = out.get(key)
        if a is None:
            out[key] = [v, v, v, 1]
        else:
            if v < a[0]:
                a[0] = v
            if v > a[1]:
                a[1] = v
            a[2] += v
            a[3] += 1
    return out


_RAW_PG = ("INSERT INTO telemetry_raw (ns, device_id, field, ts, value) "
           "SELECT v.ns, v.dev, v.f, v.ts::bigint, v.val::float8 FROM ROWS FROM ("
           "jsonb_array_elements_text(%(ns)s::jsonb), jsonb_array_elements_text(%(dev)s::jsonb), "
           "jsonb_array_elements_text(%(f)s::jsonb), jsonb_array_elements_text(%(ts)s::jsonb), "
           "jsonb_array_elements_text(%(v)s::jsonb)) AS v(ns, dev, f, ts, val)")
_AGG_PG = ("INSERT INTO telemetry_1m AS t (ns, device_id, field, bucket, vmin, vmax, vsum, n) "
           "SELECT v.ns, v.dev, v.f, v.b::bigint, v.lo::float8, v.hi::float8, v.s::float8, v.n::int FROM ROWS FROM ("
           "jsonb_array_elements_text(%(ns)s::jsonb), jsonb_array_elements_text(%(dev)s::jsonb), "
           "jsonb_array_elements_text(%(f)s::jsonb), jsonb_array_elements_text(%(b)s::jsonb), "
           "jsonb_array_elements_text(%(lo)s::jsonb), jsonb_array_elements_text(%(hi)s::jsonb), "
           "jsonb_array_elements_text(%(s)s::jsonb), jsonb_array_elements_text(%(n)s::jsonb)) "
           "AS v(ns, dev, f, b, lo, hi, s, n) "
           "ON CONFLICT (ns, device_id, field, bucket) DO UPDATE SET vmin = LEAST(t.vmin, excluded.vmin), "
           "vmax = GREATEST(t.vmax, excluded.vmax), vsum = t.vsum + excluded.vsum, n = t.n + excluded.n")
_RAW_SQLITE = "INSERT INTO telemetry_raw (ns, device_id, field, ts, value) VALUES (?, ?, ?, ?, ?)"
_AGG_SQLITE = ("INSERT INTO telemetry_1m (ns, device_id, field, bucket, vmin, vmax, vsum, n) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ns, device_id, field, bucket) DO UPDATE SET "
               "vmin = min(vmin, excluded.vmin), vmax = max(vmax, excluded.vmax), vsum = vsum + excluded.vsum, "
               "n = n + excluded.n")


def write_batch(conn: sa.Connection, batch: list[tuple[str, str, str, int, float]]) -> None:
    """Raw rows and merged 1-minute aggregates in one transaction. PostgreSQL gets each as one statement over
    parallel JSON arrays (the liveness flush's technique: next to no Python per row, see liveness._flush_rows)."""
    agg = aggregate(batch)
    if conn.dialect.name == "postgresql":
        # no wait for the WAL flush: a crash may lose this batch, as it may lose the readings still in memory
        # (module docstring); everything else keeps synchronous commits
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        cols = list(zip(*batch))
        conn.exec_driver_sql(_RAW_PG, {k: json.dumps(c) for k, c in zip(("ns", "dev", "f", "ts", "v"), cols)})
        keys, vals = list(agg), list(agg.values())
        kc, vc = list(zip(*keys)), list(zip(*vals))
        conn.exec_driver_sql(_AGG_PG, {"ns": json.dumps(kc[0]), "dev": json.dumps(kc[1]), "f": json.dumps(kc[2]),
                                       "b": json.dumps(kc[3]), "lo": json.dumps(vc[0]), "hi": json.dumps(vc[1]),
                                       "s": json.dumps(vc[2]), "n": json.dumps([int(n) for n in vc[3]])})
    else:
        conn.exec_driver_sql(_RAW_SQLITE, batch)
        conn.exec_driver_sql(_AGG_SQLITE, [(*k, v[0], v[1], v[2], int(v[3])) for k, v in agg.items()])


def expire(conn: sa.Connection, raw_before: int, agg_before: int) -> tuple[int, int]:
    raw = conn.execute(R.delete().where(R.c.ts < raw_before)).rowcount
    agg = conn.execute(M.delete().where(M.c.bucket < agg_before)).rowcount
    return raw, agg


# ---------------------------------------------------------------------- queries
def plan(since: int, until: int, step: int | None, now: int, raw_retention_ms: int) -> tuple[str, int]:
    """(source, step): raw readings while they cover `since` and the step is under a minute, else the 1-minute
    aggregates (step a whole number of minutes). Without a step, one that gives ≤ MAX_POINTS/5 points (a chart)."""
    span = max(until - since, 1)
    if step is None:
        step = max(1000, -(-span // (MAX_POINTS // 5)))
    step = max(step, -(-span // MAX_POINTS))
    if step < BUCKET_MS and since >= now - raw_retention_ms:
        return "raw", step
    return "1m", -(-step // BUCKET_MS) * BUCKET_MS


def _known(conn: sa.Connection, ns: str, dev: str) -> None:
    """NotFound for a device not enrolled (or deleted): no history is not the same as no device."""
    d = tables.devices
    if conn.execute(sa.select(d.c.device_id).where(d.c.ns == ns, d.c.device_id == dev)).first() is None:
        raise NotFound("unknown device", {"device_id": dev})


def query(conn: sa.Connection, ns: str, dev: str, field: str, since: int, until: int, step: int | None,
          now: int, raw_retention_ms: int) -> dict[str, Any]:
    """Points [ts, mean, min, max, count] per step-wide bucket in [since, until), oldest first."""
    _known(conn, ns, dev)
    source, step = plan(since, until, step, now, raw_retention_ms)
    st = sa.literal(step, sa.BigInteger)
    if source == "raw":
        b = R.c.ts.op("/")(st) * st  # integer division on both databases (SQLAlchemy's `/` is true division)
        q = (sa.select(b.label("b"), sa.func.avg(R.c.value), sa.func.min(R.c.value), sa.func.max(R.c.value),
                       sa.func.count())
             .where(R.c.ns == ns, R.c.device_id == dev, R.c.field == field, R.c.ts >= since, R.c.ts < until))
    else:
        b = M.c.bucket.op("/")(st) * st
        q = (sa.select(b.label("b"), sa.func.sum(M.c.vsum) / sa.func.sum(M.c.n), sa.func.min(M.c.vmin),
                       sa.func.max(M.c.vmax), sa.func.sum(M.c.n))
             .where(M.c.ns == ns, M.c.device_id == dev, M.c.field == field,
                    M.c.bucket >= since - since % BUCKET_MS, M.c.bucket < until))
    rows = conn.execute(q.group_by(sa.text("b")).order_by(sa.text("b"))).all()
    return {"field": field, "since": since, "until": until, "step": step, "source": source,
            "points": [[int(r[0]), float(r[1]), float(r[2]), float(r[3]), int(r[4])] for r in rows]}


def latest_from_db(conn: sa.Connection, ns: str, dev: str, since: int) -> dict[str, tuple[int, float]]:
    """The newest raw reading of each field since `since` (a device page opened on a process that has not
    ingested this device's readings itself)."""
    _known(conn, ns, dev)
    rows = conn.execute(sa.select(R.c.field, R.c.ts, R.c.value)
                        .where(R.c.ns == ns, R.c.device_id == dev, R.c.ts >= since)
                        .order_by(R.c.ts.desc()).limit(2000)).all()
    out: dict[str, tuple[int, float]] = {}
    for f, ts, v in rows:
        out.setdefault(f, (int(ts), float(v)))
    return out


class _LatestCollector:
    """`picoiot_telemetry_value{namespace, device, field}`: the newest reading per series, for at most
    `max_series` series per process (the first ones seen; a series stays until its device is deleted).
    Beyond it a reading is still stored but gets no gauge, and `picoiot_telemetry_series_dropped` counts the
    series left out: label cardinality is bounded by configuration, never by what devices send."""

    def __init__(self, tm: Telemetry, max_series: int):
        self.tm, self.max_series = tm, max_series

    def describe(self):
        return []

    def collect(self):
        tm = self.tm
        g = GaugeMetricFamily("picoiot_telemetry_value", "newest telemetry reading per device and field "
                              "(bounded: telemetry_gauge_series)", labels=["namespace", "device", "field"])
        dropped = 0
        for key, (_ts, v) in list(tm.latest.items()):
            if key not in tm._gauge_keys:
                if len(tm._gauge_keys) >= self.max_series:
                    dropped += 1
                    continue
                tm._gauge_keys.add(key)
            g.add_metric(list(key), v)
        yield g
        d = GaugeMetricFamily("picoiot_telemetry_series_dropped", "telemetry series without a gauge "
                              "(over telemetry_gauge_series)")
        d.add_metric([], dropped)
        yield d


def readings_from_heartbeat(t: Any, now: int) -> list[tuple[Any, Any, Any]]:
    """A heartbeat's compact `t` member → readings. {"field": value} is a reading taken now; {"field": [[value,
    age_ms], …]} are events (a relay switched) that happened age_ms before the heartbeat was sent — no device clock
    needed. Anything else becomes a reading the validation refuses (and counts)."""
    out: list[tuple[Any, Any, Any]] = []
    if not isinstance(t, dict):
        return [(None, now, None)]
    for f, v in t.items():
        if isinstance(v, list):
            for ev in v[:64]:
                if isinstance(ev, list) and len(ev) == 2 and type(ev[1]) is int and ev[1] >= 0:
                    out.append((f, now - ev[1], ev[0]))
                else:
                    out.append((f, now, None))
        else:
            out.append((f, now, v))
    return out
