"""Alert rules → alerts → grouped notifications in an outbox (docs/control-plane.md, *Alert notifications*).

The data part, no HTTP (router: alerting_api.py; sending: delivery.py). Each evaluation derives the set of conditions
that hold *now* from the tables the control plane already keeps (firing alarms, offline devices, paused rollouts,
devices in safe mode), compares it with the open alerts, and records every change — a new firing alert, a resolved one —
as an item of the receiver's open notification. A notification stays open for `alert_group_wait_s` and collects
every change meanwhile: 1,000 devices going offline in one sweep make one notification per receiver, and a receiver
gets at most one notification per window (the rate limit). Notifications are rows, so a restart loses none.

Several processes on one PostgreSQL: one evaluation at a time (a transaction-scoped advisory lock; the others skip
that tick), and the delivery worker claims rows with SKIP LOCKED.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import uuid
from typing import Any

import sqlalchemy as sa

from . import db as tables
from . import sealing
from .db import now_ms
from .refusals import Conflict, Invalid, NotFound

RU, RC, AL, OB = tables.alert_rules, tables.alert_receivers, tables.alerts, tables.alert_outbox
D, A, RO = tables.devices, tables.alarms, tables.rollouts
SEVERITIES = ("info", "warning", "error", "critical")
EVENTS = ("alarm", "offline", "rollout_paused", "safe_mode")
#: items kept in one notification; beyond it the notification says how many were left out
MAX_ITEMS = 1000
_LOCK_KEY = 727273


def rfc3339(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


# ---------------------------------------------------------------- configuration
def put_receiver(conn: sa.Connection, events: list, ns: str, name: str, kind: str, url: str,
                 sealed_secret: str | None) -> None:
    """sealed_secret: the webhook's key as sealing.Sealer.seal made it (never the key itself)."""
    now = now_ms()
    conn.execute(RC.delete().where(RC.c.ns == ns, RC.c.name == name))
    conn.execute(RC.insert().values(ns=ns, name=name, kind=kind, url=url, secret=sealed_secret, updated_ts=now))


def reseal_secrets(conn: sa.Connection, events: list, sealer: sealing.Sealer) -> int:
    """Seal the secrets a server from before sealing stored in plaintext; returns how many."""
    rows = conn.execute(sa.select(RC.c.ns, RC.c.name, RC.c.secret).where(RC.c.secret.is_not(None))).all()
    n = 0
    for ns, name, secret in rows:
        if not sealing.is_sealed(secret):
            conn.execute(RC.update().where(RC.c.ns == ns, RC.c.name == name).values(secret=sealer.seal(secret)))
            n += 1
    return n


def receiver_out(r) -> dict:
    return {"name": r["name"], "kind": r["kind"], "url": r["url"], "has_secret": bool(r["secret"]),
            "last_delivery": {"status": r["last_status"], "error": r["last_error"], "ts": r["last_ts"]}
            if r["last_status"] else None}


def list_receivers(conn: sa.Connection, ns: str) -> list[dict]:
    return [receiver_out(r) for r in conn.execute(sa.select(RC).where(RC.c.ns == ns).order_by(RC.c.name)).mappings()]


def delete_receiver(conn: sa.Connection, events: list, ns: str, name: str) -> None:
    users = [r[0] for r in conn.execute(sa.select(RU.c.name, RU.c.receivers).where(RU.c.ns == ns)) if name in r[1]]
    if users:
        raise Conflict("receiver used by rules", {"rules": users})
    if conn.execute(RC.delete().where(RC.c.ns == ns, RC.c.name == name)).rowcount == 0:
        raise NotFound("unknown receiver")


def put_rule(conn: sa.Connection, events: list, ns: str, name: str, rule: dict) -> dict:
    known = {r[0] for r in conn.execute(sa.select(RC.c.name).where(RC.c.ns == ns))}
    for i, rc in enumerate(rule["receivers"]):
        if rc not in known:
            raise Invalid(f"unknown receiver: {rc}", {"path": f"receivers.{i}"})
    conn.execute(RU.delete().where(RU.c.ns == ns, RU.c.name == name))
    conn.execute(RU.insert().values(ns=ns, name=name, updated_ts=now_ms(), **rule))
    return {"name": name, **rule}


def list_rules(conn: sa.Connection, ns: str) -> list[dict]:
    return [{k: r[k] for k in ("name", "event", "min_severity", "key_pattern", "offline_for_s", "receivers")}
            for r in conn.execute(sa.select(RU).where(RU.c.ns == ns).order_by(RU.c.name)).mappings()]


def delete_rule(conn: sa.Connection, events: list, ns: str, name: str) -> None:
    if conn.execute(RU.delete().where(RU.c.ns == ns, RU.c.name == name)).rowcount == 0:
        raise NotFound("unknown rule")


# ---------------------------------------------------------------- evaluation
def _conditions(conn: sa.Connection, rule: dict, now: int) -> dict[str, tuple[dict, dict, int]]:
    """fingerprint → (labels, annotations, startsAt ms) for every condition of the rule that holds now."""
    ns, out = rule["ns"], {}
    ev = rule["event"]
    if ev == "alarm":
        q = sa.select(A.c.device_id, A.c.key, A.c.severity, A.c.message, A.c.first_ts, A.c.last_ts, A.c.episodes,
                      A.c.updated_ts).where(A.c.ns == ns, A.c.state == "firing")
        if rule["min_severity"]:
            q = q.where(A.c.severity.in_(SEVERITIES[SEVERITIES.index(rule["min_severity"]):]))
        for dev, key, sev, msg, first, last, episodes, upd in conn.execute(q):
            if rule["key_pattern"] and not fnmatch.fnmatchcase(key, rule["key_pattern"]):
                continue
            labels = {"alertname": key, "namespace": ns, "device": dev, "alarm": key, "severity": sev}
            out[f"{rule['name']}|{dev}|{key}"] = (labels, {"summary": msg or key}, first if episodes == 1 else upd)
    elif ev == "offline":
        limit = now - (rule["offline_for_s"] or 0) * 1000
        for dev, last in conn.execute(sa.select(D.c.device_id, D.c.last_seen).where(
                D.c.ns == ns, D.c.online.is_(False), D.c.last_seen.is_not(None), D.c.last_seen < limit)):
            labels = {"alertname": "device_offline", "namespace": ns, "device": dev, "alarm": "device_offline",
                      "severity": rule["min_severity"] or "error"}
            out[f"{rule['name']}|{dev}"] = (labels, {"summary": f"no heartbeat for more than "
                                                                f"{rule['offline_for_s'] or 0} s"}, last)
    elif ev == "rollout_paused":
        for rid, version, reason, upd in conn.execute(sa.select(RO.c.id, RO.c.version, RO.c.reason, RO.c.updated_ts)
                                                      .where(RO.c.ns == ns, RO.c.state == "paused")):
            labels = {"alertname": "rollout_paused", "namespace": ns, "rollout": str(rid), "release": version,
                      "severity": rule["min_severity"] or "warning"}
            out[f"{rule['name']}|{rid}"] = (labels, {"summary": reason or "paused"}, upd)
    elif ev == "safe_mode":
        for dev, caps, hb, reg in conn.execute(sa.select(D.c.device_id, D.c.capabilities, D.c.heartbeat,
                                                         D.c.registered_ts).where(D.c.ns == ns)):
            if "safe_mode" in (caps or []) or (hb or {}).get("safe_mode"):
                labels = {"alertname": "safe_mode", "namespace": ns, "device": dev, "alarm": "safe_mode",
                          "severity": rule["min_severity"] or "critical"}
                out[f"{rule['name']}|{dev}"] = (labels, {"summary": "device started in safe mode"}, reg or now)
    return out


def item(labels: dict, annotations: dict, status: str, starts: int, ends: int | None, fingerprint: str) -> dict:
    """One alert as Alertmanager's postableAlert (plus status and fingerprint, which webhooks get too)."""
    out = {"status": status, "labels": {k: str(v) for k, v in labels.items()},
           "annotations": {k: str(v) for k, v in annotations.items()}, "startsAt": rfc3339(starts),
           "fingerprint": fingerprint}
    if ends is not None:
        out["endsAt"] = rfc3339(ends)
    return out


def _enqueue(conn: sa.Connection, ns: str, receiver: str, items: list[dict], now: int, wait_ms: int) -> None:
    """Add items to the receiver's open notification, or open one that waits wait_ms for more."""
    row = conn.execute(sa.select(OB.c.id, OB.c.alerts).where(OB.c.ns == ns, OB.c.receiver == receiver,
                                                             OB.c.state == "open").with_for_update()).first()
    if row is not None:
        merged = {a["fingerprint"] + a["status"]: a for a in [*row[1], *items]}  # a re-send replaces, not doubles
        conn.execute(OB.update().where(OB.c.id == row[0]).values(alerts=list(merged.values())))
        return
    conn.execute(OB.insert().values(ns=ns, receiver=receiver, idempotency_key=uuid.uuid4().hex, alerts=items,
                                    state="open", attempts=0, created_ts=now, due_ts=now + wait_ms))


def evaluate(conn: sa.Connection, events: list, group_wait_s: float, resend_s: float,
             now: int | None = None) -> int:
    """One round over every rule; returns the number of alert changes queued. Skipped (0) while another process
    evaluates (PostgreSQL)."""
    if conn.dialect.name == "postgresql" and not conn.execute(  # per schema: one database may hold several planes
            sa.text("SELECT pg_try_advisory_xact_lock(:k, hashtext(current_schema()))"), {"k": _LOCK_KEY}).scalar():
        return 0
    now = now or now_ms()
    rules = [dict(r) for r in conn.execute(sa.select(RU)).mappings()]
    kinds = {(r[0], r[1]): r[2] for r in conn.execute(sa.select(RC.c.ns, RC.c.name, RC.c.kind))}
    holding: dict[str, tuple[dict, dict, dict, int]] = {}
    for rule in rules:
        for fp, (labels, ann, starts) in _conditions(conn, rule, now).items():
            holding[f"{rule['ns']}|{fp}"] = (rule, labels, ann, starts)
    rules_by = {(r["ns"], r["name"]): r for r in rules}
    per_receiver: dict[tuple[str, str], list[dict]] = {}

    def send(ns: str, rule_name: str, it: dict, only_alertmanager: bool = False) -> None:
        rule = rules_by.get((ns, rule_name))
        for rc in (rule["receivers"] if rule else []):
            if only_alertmanager and kinds.get((ns, rc)) != "alertmanager":
                continue
            per_receiver.setdefault((ns, rc), []).append(it)

    changes = 0
    open_rows = conn.execute(sa.select(AL).where(AL.c.state == "firing")).mappings().all()
    seen = set()
    for a in open_rows:
        key = f"{a['ns']}|{a['fingerprint']}"
        seen.add(key)
        if key in holding:
            if a["sent_ts"] is not None and now - a["sent_ts"] >= resend_s * 1000:
                send(a["ns"], a["rule"], item(a["labels"], a["annotations"], "firing", a["starts_ts"], None,
                                              a["fingerprint"]), only_alertmanager=True)
                conn.execute(AL.update().where(AL.c.id == a["id"]).values(sent_ts=now))
            continue
        # the condition ended (or its rule is gone): resolved
        conn.execute(AL.update().where(AL.c.id == a["id"]).values(state="resolved", ends_ts=now, sent_ts=now))
        send(a["ns"], a["rule"], item(a["labels"], a["annotations"], "resolved", a["starts_ts"], now,
                                      a["fingerprint"]))
        changes += 1
    for key, (rule, labels, ann, starts) in holding.items():
        if key in seen:
            continue
        fp = key.split("|", 1)[1]
        conn.execute(AL.insert().values(ns=rule["ns"], rule=rule["name"], fingerprint=fp, labels=labels,
                                        annotations=ann, state="firing", starts_ts=starts, ends_ts=None, sent_ts=now))
        send(rule["ns"], rule["name"], item(labels, ann, "firing", starts, None, fp))
        changes += 1
    for (ns, rc), items in per_receiver.items():
        _enqueue(conn, ns, rc, items, now, int(group_wait_s * 1000))
    return changes


def list_alerts(conn: sa.Connection, ns: str, state: str | None, limit: int) -> list[dict]:
    q = sa.select(AL).where(AL.c.ns == ns)
    if state:
        q = q.where(AL.c.state == state)
    return [{"id": r["id"], "rule": r["rule"], "labels": r["labels"], "annotations": r["annotations"],
             "state": r["state"], "starts_ts": r["starts_ts"], "ends_ts": r["ends_ts"]}
            for r in conn.execute(q.order_by(AL.c.id.desc()).limit(limit)).mappings()]


def list_notifications(conn: sa.Connection, ns: str, receiver: str | None, limit: int) -> list[dict]:
    q = sa.select(OB).where(OB.c.ns == ns)
    if receiver:
        q = q.where(OB.c.receiver == receiver)
    return [{"id": r["id"], "receiver": r["receiver"], "idempotency_key": r["idempotency_key"], "state": r["state"],
             "alerts": len(r["alerts"]), "attempts": r["attempts"], "created_ts": r["created_ts"],
             "due_ts": r["due_ts"], "delivered_ts": r["delivered_ts"], "last_error": r["last_error"]}
            for r in conn.execute(q.order_by(OB.c.id.desc()).limit(limit)).mappings()]


def payload(ns: str, receiver: str, key: str, items: list[dict]) -> dict[str, Any]:
    """A webhook's JSON body: every alert of the notification (at most MAX_ITEMS; `truncated` counts the rest)."""
    firing = sum(1 for a in items if a["status"] == "firing")
    return {"version": 1, "namespace": ns, "receiver": receiver, "idempotency_key": key,
            "status": "firing" if firing else "resolved", "firing": firing, "resolved": len(items) - firing,
            "alerts": items[:MAX_ITEMS], "truncated": max(0, len(items) - MAX_ITEMS)}
