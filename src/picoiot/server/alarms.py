"""Alarms' data: ingestion with dedup and episodes, the server's own alarms, list/filter, ack. Knows no HTTP (the
routes are in alarms_api.py).

Dedup key: (namespace, device, key). A device sends its *running* count for the current firing episode, so a retried
batch carries the same numbers: the server keeps max(count) per episode, which makes retries idempotent. An episode
ends when the alarm resolves; a later firing (newer than anything stored) starts the next episode and re-arms
acknowledgement. count = sum of closed episodes' counts + the current episode's max.
"""
from __future__ import annotations

import sqlalchemy as sa

from . import changes
from .changes import Events
from . import db as tables
from .db import now_ms
from .models import AlarmIn, AlarmOut
from .refusals import NotFound

A = tables.alarms


def _get(conn: sa.Connection, ns: str, dev: str, key: str):
    return conn.execute(sa.select(A).where(A.c.ns == ns, A.c.device_id == dev, A.c.key == key)
                        .with_for_update()).mappings().first()


def _insert(conn, ns, dev, key, severity, message, state, count, first_ts, last_ts, now) -> None:
    conn.execute(A.insert().values(ns=ns, device_id=dev, key=key, severity=severity, message=message, state=state,
                                   count_base=0, episode_count=count, episodes=1, first_ts=first_ts,
                                   last_ts=last_ts, acked=False, updated_ts=now))


def apply_one(conn: sa.Connection, ns: str, dev: str, a: AlarmIn, now: int) -> None:
    first_ts = a.first_ts if a.first_ts is not None else now
    last_ts = max(a.last_ts if a.last_ts is not None else now, first_ts)
    row = _get(conn, ns, dev, a.key)
    if row is None:
        _insert(conn, ns, dev, a.key, a.severity, a.message, a.state, a.count, first_ts, last_ts, now)
        return
    values: dict = {}
    if a.state == "firing":
        if row["state"] == "firing":
            values = {"episode_count": max(row["episode_count"], a.count), "last_ts": max(row["last_ts"], last_ts),
                      "severity": a.severity, "message": a.message}
        elif last_ts > row["last_ts"]:  # fired again after it resolved: a new episode
            values = {"state": "firing", "count_base": row["count_base"] + row["episode_count"],
                      "episode_count": a.count, "episodes": row["episodes"] + 1, "last_ts": last_ts,
                      "severity": a.severity, "message": a.message, "acked": False, "acked_by": None,
                      "acked_ts": None}
        # else: a retry of an older firing that has since resolved — nothing new
    else:
        if row["state"] == "firing" and last_ts >= row["last_ts"]:
            values = {"state": "resolved", "episode_count": max(row["episode_count"], a.count),
                      "last_ts": last_ts, "message": a.message or row["message"]}
        elif row["state"] == "resolved":
            values = {"episode_count": max(row["episode_count"], a.count), "last_ts": max(row["last_ts"], last_ts)}
    if values:
        values["first_ts"] = min(row["first_ts"], first_ts)
        values["updated_ts"] = now
        conn.execute(A.update().where(A.c.id == row["id"]).values(**values))


def fire_server_alarm(conn: sa.Connection, ns: str, dev: str, key: str, severity: str, message: str,
                      ts: int) -> None:
    """An alarm the server raises itself (device_offline): one count per episode."""
    row = _get(conn, ns, dev, key)
    if row is None:
        _insert(conn, ns, dev, key, severity, message, "firing", 1, ts, ts, ts)
    elif row["state"] != "firing":
        conn.execute(A.update().where(A.c.id == row["id"]).values(
            state="firing", count_base=row["count_base"] + row["episode_count"], episode_count=1,
            episodes=row["episodes"] + 1, last_ts=ts, severity=severity, message=message, acked=False,
            acked_by=None, acked_ts=None, updated_ts=ts))


def resolve_server_alarm(conn: sa.Connection, ns: str, dev: str, key: str, ts: int) -> None:
    conn.execute(A.update().where(A.c.ns == ns, A.c.device_id == dev, A.c.key == key, A.c.state == "firing")
                 .values(state="resolved", last_ts=ts, updated_ts=ts))


def _device_exists(conn, ns, dev) -> bool:
    d = tables.devices
    return conn.execute(sa.select(d.c.device_id).where(d.c.ns == ns, d.c.device_id == dev)).first() is not None


def ingest(conn: sa.Connection, events: Events, ns: str, dev: str, items: list[AlarmIn]) -> int:
    if not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    now = now_ms()
    # one batch may name a key twice (fire then resolve): apply in order, merging into the same row
    for a in items:
        apply_one(conn, ns, dev, a, now)
    events.local(changes.alarm(ns, dev))  # this process's live views (events.py)
    return len(items)


def to_out(row) -> AlarmOut:
    return AlarmOut(id=row["id"], namespace=row["ns"], device_id=row["device_id"], key=row["key"],
                    severity=row["severity"], message=row["message"], state=row["state"],
                    count=row["count_base"] + row["episode_count"], episodes=row["episodes"],
                    first_ts=row["first_ts"], last_ts=row["last_ts"], acked=row["acked"],
                    acked_by=row["acked_by"], acked_ts=row["acked_ts"])


def list_alarms(conn: sa.Connection, ns: str, state: str | None, severity: str | None, device: str | None,
                key: str | None, acked: bool | None, limit: int) -> list[AlarmOut]:
    q = sa.select(A).where(A.c.ns == ns)
    if state:
        q = q.where(A.c.state == state)
    if severity:
        q = q.where(A.c.severity == severity)
    if device:
        q = q.where(A.c.device_id == device)
    if key:
        q = q.where(A.c.key == key)
    if acked is not None:
        q = q.where(A.c.acked.is_(acked))
    q = q.order_by(A.c.last_ts.desc(), A.c.id.desc()).limit(limit)
    return [to_out(r) for r in conn.execute(q).mappings()]


def ack(conn: sa.Connection, events: Events, ns: str, alarm_id: int, by: str) -> AlarmOut:
    row = conn.execute(sa.select(A).where(A.c.ns == ns, A.c.id == alarm_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound("unknown alarm")
    if not row["acked"]:
        now = now_ms()
        conn.execute(A.update().where(A.c.id == alarm_id).values(acked=True, acked_by=by, acked_ts=now,
                                                                  updated_ts=now))
        row = conn.execute(sa.select(A).where(A.c.id == alarm_id)).mappings().first()
        events.local(changes.alarm(ns, row["device_id"]))  # live views (events.py)
    return to_out(row)
