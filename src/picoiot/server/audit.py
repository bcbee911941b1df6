"""The audit log: who (token subject and role) did what (method, resource) when, with a before/after summary.
Knows no HTTP (the middleware that feeds it and the route that reads it are in audit_api.py).

Append-only for every role: no route changes or deletes an entry, and the database refuses it too (triggers from
migration 3 abort UPDATE and DELETE, and TRUNCATE on PostgreSQL), so not even a bug in the server can rewrite it.
Secrets never enter it: values under keys that look like keys, tokens, secrets, passwords or signatures are replaced
by "***" before anything is stored.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import sqlalchemy as sa

from . import db as tables
from .auth import ALL_NAMESPACES

A = tables.audit_log
_SECRET = re.compile(r"key|token|secret|password|signature|ticket", re.I)
#: JSON text kept per part of the summary; beyond it a head and the size
MAX_PART = 2000

_NS = re.compile(r"^/api/v1/namespaces/([^/]+)(/.*)?$")
_DEV = re.compile(r"^/devices/([^/]+)(/.*)?$")


def resource_of(path: str) -> tuple[str, str, str | None] | None:
    """(namespace or "*", resource, device id) of an operator write's path; None for paths that are not audited
    (the devices' own API: heartbeats, reports, telemetry)."""
    if path == "/api/v1/namespaces":
        return ALL_NAMESPACES, "namespace", None
    if path.startswith("/api/v1/device-types/"):
        return ALL_NAMESPACES, "device_type", None
    m = _NS.match(path)
    if m is None:
        return None
    ns, rest = m.group(1), m.group(2) or ""
    d = _DEV.match(rest)
    if d is not None:
        dev, sub = d.group(1), d.group(2) or ""
        if sub.startswith("/shadows"):
            return ns, "state", dev
        if sub.startswith("/config"):
            return ns, "config", dev
        return ns, "device", dev
    if rest == "/devices":
        return ns, "enrolment", None
    for prefix, name in (("/groups", "group"), ("/ota", "ota"), ("/alarms", "alarm"), ("/tokens", "token")):
        if rest.startswith(prefix):
            return ns, name, None
    return ns, rest.strip("/").split("/")[0][:32] or "namespace", None


def _storable(value: Any) -> Any:
    # a refused request may hold what no database column can (a NUL: PostgreSQL's JSONB refuses it) or JSON cannot
    # (NaN): the summary keeps a visible stand-in, so the attempt is still on record
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {_storable(str(k)): ("***" if _SECRET.search(str(k)) and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return _storable(value)


def summarise(raw: bytes | None) -> Any:
    """A JSON body as stored in the summary: parsed, redacted, and cut to MAX_PART characters of JSON."""
    if not raw:
        return None
    try:
        value = redact(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        return {"non_json_bytes": len(raw)}
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_PART:
        return {"truncated": True, "json_chars": len(text), "head": text[:MAX_PART // 4]}
    return value


def append(conn: sa.Connection, *, ns: str, ts: int, sub: str, role: str, via: str, method: str, path: str,
           resource: str, device_id: str | None, status: int, summary: dict[str, Any]) -> None:
    conn.execute(A.insert().values(ns=ns, ts=ts, sub=sub[:128], role=role, via=via, method=method, path=path[:512],
                                   resource=resource, device_id=device_id, status=status, summary=summary))


def entries(conn: sa.Connection, namespaces: list[str], sub: str | None = None, resource: str | None = None,
            device: str | None = None, method: str | None = None, since: int | None = None,
            until: int | None = None, before_id: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Newest first; `before_id` pages further back."""
    q = sa.select(A).where(A.c.ns.in_(namespaces))
    for col, val in ((A.c.sub, sub), (A.c.resource, resource), (A.c.device_id, device), (A.c.method, method)):
        if val is not None:
            q = q.where(col == val)
    if since is not None:
        q = q.where(A.c.ts >= since)
    if until is not None:
        q = q.where(A.c.ts < until)
    if before_id is not None:
        q = q.where(A.c.id < before_id)
    rows = conn.execute(q.order_by(A.c.id.desc()).limit(limit)).mappings()
    return [{"id": r["id"], "namespace": r["ns"], "ts": r["ts"], "sub": r["sub"], "role": r["role"],
             "via": r["via"], "method": r["method"], "path": r["path"], "resource": r["resource"],
             "device_id": r["device_id"], "status": r["status"], "summary": r["summary"]} for r in rows]
