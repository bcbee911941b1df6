"""Admission control: beyond a bound, answer 503 at once instead of queuing work whose client will give up.

Without it, offered load above capacity makes every request wait behind abandoned ones until the client times out,
and throughput collapses (docs/benchmarks.md, Control plane load). A device treats a 503 heartbeat as missed and
retries at its next interval, which is what an overloaded server wants.

Two classes, counted apart:
- *requests*: everything that works (CPU, database) — at most `max_requests_in_flight` at once;
- *long-polls* (a `wait=` > 0 in the query): they cost a coroutine and a subscription while they wait, not CPU or a
  thread, so they have their own, much larger bound (`max_longpolls`). Counting them as requests would let a few
  hundred devices holding a blocking query starve every heartbeat of a slot.
- *registrations* (`/api/devices/challenge` and `/register`), also requests: the dearest thing a device asks for
  (a transaction of about ten statements), and after a control-plane restart every device asks at once. Beyond
  `max_registrations_in_flight` they are refused with 503 + Retry-After at once — a device retries, jittered — rather
  than queued behind each other until the devices' own timeouts (10 s) cut them off and they start over. A register
  (the answer to a challenge) is admitted up to twice that bound, so the surplus is refused at the challenge: in a
  20,000-device storm two challenges in three were otherwise wasted by a 503 to their answer.
`/health`, `/ready` and `/metrics` are never refused: probes must see an overloaded server as alive.

The database's thread-pool queue has its own bound (`Database.max_queue`, `DatabaseBusy` → the same 503).
"""
from __future__ import annotations

import json

EXEMPT = frozenset({"/health", "/ready", "/metrics"})
CHALLENGE = "/api/devices/challenge"
REGISTRATION = frozenset({CHALLENGE, "/api/devices/register"})
RETRY_AFTER_S = 1


def is_longpoll(query_string: bytes) -> bool:
    if b"wait=" not in query_string:
        return False
    for part in query_string.split(b"&"):
        if part.startswith(b"wait="):
            try:
                return float(part[5:]) > 0
            except ValueError:
                return False  # the handler answers 422 for it
    return False


def busy_body(kind: str, limit: int) -> bytes:
    return json.dumps({"error": "server busy, retry later", "detail": {"limit": kind, "max": limit}}).encode()


async def send_error(send, status: int, doc: dict) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_busy(send, kind: str, limit: int) -> None:
    body = busy_body(kind, limit)
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """Pure ASGI middleware; single event loop, so plain counters are enough."""

    def __init__(self, app, metrics, max_requests: int, max_longpolls: int, max_registrations: int = 64):
        self.app = app
        self.metrics = metrics
        self.max_requests = max_requests
        self.max_longpolls = max_longpolls
        self.max_registrations = max_registrations
        self.requests = 0
        self.longpolls = 0
        self.registrations = 0
        metrics.requests_in_flight.set_function(lambda: self.requests)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            return await self.app(scope, receive, send)
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            # no path or query parameter takes a NUL (the OpenAPI document says so; PostgreSQL cannot compare it)
            return await send_error(send, 422, {"error": "invalid request", "detail": {
                "in": "path" if "\x00" in scope["path"] else "query", "message": "NUL character in the URL"}})
        if is_longpoll(scope["query_string"]):
            if self.longpolls >= self.max_longpolls:
                self.metrics.overload_rejections.labels("longpoll").inc()
                return await send_busy(send, "longpolls", self.max_longpolls)
            self.longpolls += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self.longpolls -= 1
        if self.requests >= self.max_requests:
            self.metrics.overload_rejections.labels("request").inc()
            return await send_busy(send, "requests", self.max_requests)
        if scope["path"] in REGISTRATION:
            # an answer (register) may go up to twice the bound: refusing it would throw away the challenge its device
            # was given a moment ago, and have it start over; the surplus is refused at the challenge instead
            limit = self.max_registrations * (1 if scope["path"] == CHALLENGE else 2)
            if self.registrations >= limit:
                self.metrics.overload_rejections.labels("registration").inc()
                return await send_busy(send, "registrations", limit)
            self.registrations += 1
            self.requests += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                self.requests -= 1
                self.registrations -= 1
        self.requests += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.requests -= 1
