"""The audit log's feed and view: an ASGI middleware that records every operator write, and the route that lists
them (the data part is audit.py).

Why a middleware and not a line in each route: one place sees every write of every service (state, config, OTA,
enrolment, groups, types, alarms acknowledgement, namespaces), including the ones that are refused, and a new route
is audited without anyone remembering to. It runs inside the body-size limit, only for POST/PUT/PATCH/DELETE by an
operator's token or dashboard session (never on a device's own requests, so the heartbeat path does not see it).
The "before" of a PUT/PATCH/DELETE (and of a shadow update) is the same resource read through the app just before
the write, as the caller would have seen it; "after" is the answer.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from prometheus_client import Counter

from . import audit
from .auth import ALL_NAMESPACES, SESSION_COOKIE, Principal, bearer_token, require_ns, require_role
from .db import now_ms
from .deps import CP, Caller
from .errors import ApiError
from .models import AuditList, ErrorBody

if TYPE_CHECKING:
    from .core import ControlPlane

log = logging.getLogger("picoiot.server")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
_MAX_CAPTURE = 64 * 1024


def _header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def _cookie(scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class AuditTrail:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app, cp: "ControlPlane"):
        self.app, self.cp = app, cp
        self.failures = Counter("picoiot_audit_failures", "audit entries that could not be written",
                                registry=cp.metrics.registry)

    def _who(self, scope) -> tuple[Principal, str] | None:
        cp = self.cp
        auth = _header(scope, b"authorization")
        via = "api"
        if auth is not None:
            token = bearer_token(auth)
            ua = _header(scope, b"user-agent") or ""
            via = "cli" if ua.startswith("picoiot-cli") else "api"
        else:
            token = _cookie(scope, SESSION_COOKIE)
            via = "ui"
        if not token:
            return None
        try:
            p = cp.tokens.principal(cp.settings.secrets.signing_key, token)
        except ApiError:
            return None  # the app answers 401: there is no subject to record
        return (None, via) if p.is_device else (p, via)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in WRITES:
            return await self.app(scope, receive, send)
        target = audit.resource_of(scope["path"])
        who = self._who(scope) if target is not None else None
        if target is None or who is None or who[0] is None:
            return await self.app(scope, receive, send)
        p, via = who
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client went away; nothing was written
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        method = scope["method"]
        before = None
        if method in ("PUT", "PATCH", "DELETE") or "/shadows/" in scope["path"]:
            before = await self._read_before(scope)
        sent: list[dict] = []
        captured = bytearray()
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(captured) < _MAX_CAPTURE:
                captured.extend(message.get("body", b""))
            sent.append(message)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, capture)
        ns, resource, dev = target
        summary = {"request": audit.summarise(bytes(body)), "before": before,
                   "after": audit.summarise(bytes(captured)) if len(captured) < _MAX_CAPTURE else {"truncated": True}}
        try:
            await self.cp.write(lambda conn, _e: audit.append(
                conn, ns=ns, ts=now_ms(), sub=p.sub, role=p.role, via=via, method=method, path=scope["path"],
                resource=resource, device_id=dev, status=status, summary=summary))
        except Exception as e:  # the write itself is done: answer it, and say loudly that its record is missing
            self.failures.inc()
            log.error("audit entry not written (%s): %s %s by %s", type(e).__name__, method, scope["path"], p.sub)
        for message in sent:
            await send(message)

    async def _read_before(self, scope) -> Any:
        """The resource as a GET of the same path answers it now (None when there is no such GET or it fails)."""
        sub = {**scope, "method": "GET", "query_string": b"",
               "headers": [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]}
        chunks = bytearray()
        status = 0

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(chunks) < _MAX_CAPTURE:
                chunks.extend(message.get("body", b""))

        try:
            await self.app(sub, receive, send)
        except Exception:
            return None
        return audit.summarise(bytes(chunks)) if status == 200 else None


router = APIRouter(tags=["audit"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404)}


@router.get("/api/v1/namespaces/{ns}/audit", response_model=AuditList, responses=_ERR)
async def get_audit(ns: str, request: Request, p: Caller, cp: CP,
                    sub: str | None = Query(None, max_length=128), resource: str | None = Query(None, max_length=32),
                    device: str | None = Query(None, max_length=64),
                    method: str | None = Query(None, pattern="^(POST|PUT|PATCH|DELETE)$"),
                    since: int | None = Query(None, ge=0, le=2**53), until: int | None = Query(None, ge=0, le=2**53),
                    before_id: int | None = Query(None, ge=1, le=2**62),
                    limit: int = Query(200, ge=1, le=1000)) -> dict:
    """Operator writes in the namespace, newest first (with a token for all namespaces, also the global ones:
    namespaces, device types). Filter by subject, resource, device, method, time; page with `before_id`.
    The log is append-only: there is no route that changes or deletes it."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    namespaces = [ns, ALL_NAMESPACES] if p.ns == ALL_NAMESPACES else [ns]
    rows = await cp.read(audit.entries, namespaces, sub, resource, device, method, since, until,
                                           before_id, limit)
    return {"entries": rows}
