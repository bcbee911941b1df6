"""Delivery of queued notifications (alerting.py's outbox) to webhooks and Alertmanager.

At least once: a row is claimed (its due time moved past the attempt's timeout, a lease) and committed before it is
sent; it becomes `delivered` only after the receiver answered 2xx. A process that dies mid-send leaves the row to be
sent again when the lease ends, with the same idempotency key (`Idempotency-Key` header and body field) so the
receiver can drop the duplicate. Failures are retried with exponential backoff until `alert_give_up_s` after the
notification was created, then `gave_up`; each receiver keeps its last outcome.

Webhook signature: `X-Picoiot-Signature: sha256=<hex HMAC-SHA256(secret, "<X-Picoiot-Timestamp>." + body)>` — the
timestamp is signed too, so a captured request cannot be replayed later as a fresh one.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa

from . import alerting, sealing
from . import db as tables
from .db import now_ms

if TYPE_CHECKING:
    from .core import ControlPlane

log = logging.getLogger("picoiot.server.alerts")
OB, RC = tables.alert_outbox, tables.alert_receivers
#: notifications claimed per round
BATCH = 16


def sign(secret: str, ts: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()


def _claim(conn: sa.Connection, events: list, now: int, lease_ms: int) -> list[dict]:
    q = (sa.select(OB.c.id, OB.c.ns, OB.c.receiver, OB.c.idempotency_key, OB.c.alerts, OB.c.attempts,
                   OB.c.created_ts, RC.c.kind, RC.c.url, RC.c.secret)
         .select_from(OB.outerjoin(RC, sa.and_(RC.c.ns == OB.c.ns, RC.c.name == OB.c.receiver)))
         .where(OB.c.state.in_(("open", "pending")), OB.c.due_ts <= now).order_by(OB.c.due_ts).limit(BATCH)
         .with_for_update(of=OB, skip_locked=True))
    rows = [dict(r) for r in conn.execute(q).mappings()]
    for r in rows:
        conn.execute(OB.update().where(OB.c.id == r["id"]).values(state="pending", attempts=r["attempts"] + 1,
                                                                 due_ts=now + lease_ms))
    return rows


def _done(conn: sa.Connection, events: list, row: dict, error: str | None, settings) -> str:
    now = now_ms()
    if error is None:
        state, values = "delivered", {"state": "delivered", "delivered_ts": now, "last_error": None}
    elif now - row["created_ts"] >= settings.alert_give_up_s * 1000 or row["kind"] is None:
        state, values = "gave_up", {"state": "gave_up", "last_error": error[:256]}
    else:
        wait = min(settings.alert_retry_first_s * 2 ** row["attempts"], settings.alert_retry_max_s)
        state, values = "retrying", {"due_ts": now + int(wait * 1000), "last_error": error[:256]}
    conn.execute(OB.update().where(OB.c.id == row["id"]).values(**values))
    conn.execute(RC.update().where(RC.c.ns == row["ns"], RC.c.name == row["receiver"]).values(
        last_status=state, last_error=None if error is None else error[:256], last_ts=now))
    return state


def request_for(row: dict, secret: str | None) -> tuple[str, bytes, dict[str, str]]:
    """(url, body, headers) of one notification; `secret`: the webhook's key, opened."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": row["idempotency_key"],
               "User-Agent": "picoiot-alerts/1"}
    if row["kind"] == "alertmanager":
        # postableAlerts: a list of {labels, annotations, startsAt, endsAt?, generatorURL?}
        body = json.dumps([{k: a[k] for k in ("labels", "annotations", "startsAt", "endsAt") if k in a}
                           for a in row["alerts"]]).encode()
        return row["url"].rstrip("/") + "/api/v2/alerts", body, headers
    body = json.dumps(alerting.payload(row["ns"], row["receiver"], row["idempotency_key"], row["alerts"])).encode()
    if secret:
        ts = str(int(time.time()))
        headers["X-Picoiot-Timestamp"] = ts
        headers["X-Picoiot-Signature"] = sign(secret, ts, body)
    return row["url"], body, headers


class Delivery:
    """The delivery task: claims due notifications and sends them, each attempt bounded by alert_timeout_s."""

    def __init__(self, cp: "ControlPlane"):
        self.cp = cp
        self.client = httpx.AsyncClient(timeout=cp.settings.alert_timeout_s, follow_redirects=False)
        self.wake = asyncio.Event()
        self.resealed = False

    @property
    def sealer(self) -> sealing.Sealer:
        return sealing.for_key(self.cp.settings.secrets.signing_key)

    async def close(self) -> None:
        await self.client.aclose()

    async def _send(self, row: dict) -> str | None:
        if row["kind"] is None:
            return "receiver deleted"
        try:
            secret = self.sealer.open(row["secret"]) if row["secret"] else None
        except sealing.Unreadable as e:
            return str(e)  # names no part of the secret: it goes into the log and the receiver's last error
        url, body, headers = request_for(row, secret)
        try:
            r = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}"
        if 200 <= r.status_code < 300:
            return None
        return f"HTTP {r.status_code}"

    async def round(self) -> int:
        """Send every due notification once; returns how many were attempted."""
        s = self.cp.settings
        if not self.resealed:
            n = await self.cp.write(alerting.reseal_secrets, self.sealer)
            if n:
                log.info("sealed %d receiver secrets stored in plaintext", n)
            self.resealed = True
        rows = await self.cp.write(_claim, now_ms(), int((s.alert_timeout_s + 5) * 1000))
        if not rows:
            return 0
        errors = await asyncio.gather(*(self._send(r) for r in rows))
        for row, err in zip(rows, errors):
            state = await self.cp.write(_done, row, err, s)
            if err is not None:
                log.warning("notification %s to %s: %s (%s)", row["id"], row["receiver"], err, state)
        return len(rows)
