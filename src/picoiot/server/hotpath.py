"""The hottest requests — a device's heartbeat (plain or held as a long-poll), `/health` and the registration's
challenge and answer — answered without FastAPI's per-request machinery (route scan over every path, dependency solving,
exception middlewares, response classes).

Why: measured in-process, FastAPI's layers cost ≈ 200 µs of a heartbeat's ≈ 230 µs, and a fleet of 20,000 devices
at a 10 s interval is 2,000 heartbeats/s on a 2-core box (docs/benchmarks.md, Control plane load); a device holding
its heartbeat as a long-poll (`wait=`) pays that at every cycle too.

Only the happy case is served here. Anything else — no or unknown token, a body that does not validate, a device the
version cache does not hold, a query string other than the long-poll's own parameters in their plainest form
(`_poll`), an oversize body, any error while recording or waiting — is handed to the FastAPI app unchanged (the body
read so far is replayed), so every error answer and the OpenAPI schema stay FastAPI's. What is done and answered is
`heartbeat.beat`, the FastAPI route's own, and who may is decided by `auth.own_device_ns`, the route's own check.

A registration's two requests (a fleet re-registering after a restart is 20,000 of each) are served when the body is
plain JSON that validates (else FastAPI answers, 400 or 422), by the routes' own `discovery.challenge_answer` and
`register_answer`; their refusals (429, 404, 401, 422) are answered here as the app's error handler renders them,
since by then the address limiter has counted the request, or the nonce is used up.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from . import heartbeat
from .auth import bearer_token, own_device_ns
from .discovery import challenge_answer, register_answer
from .discovery_api import CHALLENGE_ROUTE, REGISTER_ROUTE
from .errors import ApiError, from_refusal
from .models import ChallengeIn, HeartbeatIn, RegisterIn
from .refusals import Refused

if TYPE_CHECKING:
    from .core import ControlPlane

PREFIX, SUFFIX = "/api/v1/devices/", "/heartbeat"
HEARTBEAT_ROUTE = "/api/v1/devices/{device_id}/heartbeat"  # the FastAPI route's path: the same metrics labels
_JSON = (b"content-type", b"application/json")


class _Fallback(Exception):
    pass


class HotPath:
    """Pure ASGI middleware, outside the FastAPI app (inside admission control)."""

    def __init__(self, app, cp: "ControlPlane", health: bool = True, heartbeats: bool = True,
                 registrations: bool = True):
        self.app = app
        self.cp = cp
        self.health, self.heartbeats, self.registrations = health, heartbeats, registrations
        self.max_body = cp.settings.max_body_bytes
        self._health = json.dumps({"status": "ok"}).encode()
        self._pid = str(os.getpid()).encode()
        fp = cp.metrics.fast_path
        self._served_health = fp.labels("/health", "served")
        self._served_hb, self._fallback_hb = fp.labels(HEARTBEAT_ROUTE, "served"), fp.labels(HEARTBEAT_ROUTE, "fallback")
        self._registration_counters = {p: (fp.labels(p, "served"), fp.labels(p, "fallback")) for p in _REGISTRATION}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/health" and scope["method"] == "GET" and self.health:
                start = time.perf_counter()
                await _send_json(send, 200, self._health, ((b"x-picoiot-pid", self._pid),))
                self.cp.metrics.observe("GET", "/health", 200, start)
                self._served_health.inc()
                return
            if self.heartbeats and scope["method"] == "POST" and path.startswith(PREFIX) and path.endswith(SUFFIX):
                start = time.perf_counter()
                chunks: list[bytes] = []
                complete = False
                poll = _poll(scope["query_string"])
                if poll is not None:  # else a query for FastAPI to validate (and answer 422 for)
                    chunks, complete = await _read_body(receive, self.max_body)
                if complete:
                    try:
                        body = await self._heartbeat(scope, path[len(PREFIX):-len(SUFFIX)], b"".join(chunks), poll)
                    except _Fallback:
                        pass
                    else:
                        await _send_json(send, 200, body)
                        self.cp.metrics.observe("POST", HEARTBEAT_ROUTE, 200, start)
                        self._served_hb.inc()
                        return
                self._fallback_hb.inc()
                if chunks:
                    receive = _replay(chunks, receive, complete)
            elif path in _REGISTRATION and scope["method"] == "POST" and self.registrations:
                start = time.perf_counter()
                chunks, complete = await _read_body(receive, self.max_body)
                body = _json_body(scope, b"".join(chunks), _REGISTRATION[path]) if complete else None
                served, fallback = self._registration_counters[path]
                if body is not None:
                    try:
                        response = await self._registration(scope, path, body)
                    except _Fallback:
                        pass
                    else:
                        await response(scope, receive, send)
                        self.cp.metrics.observe("POST", path, response.status_code, start)
                        served.inc()
                        return
                fallback.inc()
                receive = _replay(chunks, receive, complete)
        await self.app(scope, receive, send)

    async def _registration(self, scope, path: str, body):
        """The route's answer (discovery.challenge_answer, register_answer), refusals rendered as errors.install's
        handler renders them. Anything unexpected is handed to the route, which redoes it: a write that failed was
        rolled back (as a device's retry would find it), and what follows the commit does no I/O."""
        cp = self.cp
        try:
            if path == CHALLENGE_ROUTE:
                client = scope.get("client")
                out = challenge_answer(cp, client[0] if client else "", body)
            else:
                out = await register_answer(cp, cp.base_url(Request(scope)), body)
        except Refused as refused:
            return from_refusal(refused).response()
        except Exception:  # the database queue full, a lost connection…: the route answers it
            raise _Fallback from None
        return JSONResponse(out.model_dump(mode="json"))

    async def _heartbeat(self, scope, device_id: str, raw: bytes, poll: tuple) -> bytes:
        if not device_id or "/" in device_id:
            raise _Fallback
        token = _bearer(scope["headers"])
        cp = self.cp
        p = cp.tokens.fresh(token)
        if p is None:  # not verified yet, invalid or expired: the FastAPI route checks it (and caches or answers 401)
            raise _Fallback
        try:
            ns = own_device_ns(p, device_id, "send heartbeats")  # the route's own decision
        except ApiError:  # an operator, another device's path…: the route answers the error
            raise _Fallback from None
        entry = cp.versions.get(ns, device_id)
        if entry is None:  # not cached: the FastAPI route loads it (or answers 404)
            raise _Fallback
        try:
            body = HeartbeatIn.model_validate_json(raw)
        except ValidationError:
            raise _Fallback from None
        try:
            return await heartbeat.beat(cp, ns, device_id, body, entry, *poll)
        except Exception:  # gone meanwhile, database busy…: the FastAPI route redoes it and answers the error
            raise _Fallback from None


#: the registration's two requests served here, and the body each takes
_REGISTRATION: dict[str, type[BaseModel]] = {CHALLENGE_ROUTE: ChallengeIn, REGISTER_ROUTE: RegisterIn}


def _json_body(scope, raw: bytes, model: type[BaseModel]) -> BaseModel | None:
    """The body as the route would receive it, or None when FastAPI is to parse (and answer) it: the plainest form
    only — no query, `Content-Type: application/json`, a JSON object that validates."""
    if scope["query_string"]:
        return None
    types = [v for k, v in scope["headers"] if k == b"content-type"]
    if types != [b"application/json"]:
        return None
    try:
        doc = json.loads(raw)
        return model.model_validate(doc) if isinstance(doc, dict) else None
    except (ValueError, ValidationError):
        return None


_NO_POLL = (None, None, None, None)
#: the forms of the long-poll's parameters served here: plain decimals within the route's bounds, no leading zeros,
#: so that they parse to what FastAPI's Query validation gives; anything else (and any other or repeated parameter)
#: is FastAPI's to answer
_WAIT = re.compile(r"(0|[1-9][0-9]{0,4})(\.[0-9]{1,6})?")
_VERSION = re.compile(r"0|[1-9][0-9]{0,9}")
_OTA = re.compile(heartbeat.OTA_PATTERN.lstrip("^").rstrip("$"))


def _poll(query: bytes) -> tuple | None:
    """(wait, config_version, state_version, ota) of a heartbeat's query, as the route would receive them, or None
    when the query is not one the fast path serves."""
    if not query:
        return _NO_POLL
    args: dict[str, str] = {}
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):  # as Starlette parses it
        if key in args:
            return None
        args[key] = value
    wait = args.pop("wait", None)
    if wait is not None and (not _WAIT.fullmatch(wait) or float(wait) > heartbeat.WAIT_MAX_S):
        return None
    versions = []
    for key in ("config_version", "state_version"):
        v = args.pop(key, None)
        if v is not None and (not _VERSION.fullmatch(v) or int(v) > heartbeat.VERSION_MAX):
            return None
        versions.append(None if v is None else int(v))
    ota = args.pop("ota", None)
    if args or (ota is not None and not _OTA.fullmatch(ota)):
        return None
    return None if wait is None else float(wait), versions[0], versions[1], ota


def _bearer(headers) -> str:
    for k, v in headers:
        if k == b"authorization":
            token = bearer_token(v.decode("latin-1"))
            if token is not None:
                return token
            break
    raise _Fallback


async def _read_body(receive, limit: int) -> tuple[list[bytes], bool]:
    """The request body's chunks; complete=False when it ended early (disconnect) or passed `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return chunks, False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks, False
        if not message.get("more_body", False):
            return chunks, True


def _replay(chunks: list[bytes], receive, complete: bool):
    """A receive() that hands out what was already read, then continues with the real one."""
    pending = list(chunks)

    async def replayed():
        if pending:
            chunk = pending.pop(0)
            more = bool(pending) or not complete
            return {"type": "http.request", "body": chunk, "more_body": more}
        return await receive()

    return replayed


async def _send_json(send, status: int, body: bytes, extra: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
