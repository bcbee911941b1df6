"""Prometheus metrics on a per-app registry (tests create many apps in one process), and the ASGI middleware that
counts requests and enforces the body size limit before any handler reads the body."""
from __future__ import annotations

import json
import time

from starlette.exceptions import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("picoiot_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("picoiot_http_request_duration_seconds", "HTTP request latency", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.devices_online = Gauge("picoiot_devices_online", "devices currently online", registry=self.registry)
        self.devices_total = Gauge("picoiot_devices", "devices known", registry=self.registry)
        self.alarms_firing = Gauge("picoiot_alarms_firing", "alarms currently firing", registry=self.registry)
        self.longpolls = Gauge("picoiot_longpolls_waiting", "long-poll requests waiting", ["kind"],
                               registry=self.registry)
        self.heartbeats = Counter("picoiot_heartbeats", "heartbeats received", registry=self.registry)
        self.registrations = Counter("picoiot_registrations", "registration attempts", ["result"],
                                     registry=self.registry)
        self.housekeeping_errors = Counter("picoiot_housekeeping_errors", "failed liveness flush/sweep rounds",
                                           registry=self.registry)
        self.version_cache_misses = Counter(
            "picoiot_version_cache_misses", "device version lookups (heartbeat, token refresh) that read the database",
            registry=self.registry)
        self.overload_rejections = Counter("picoiot_overload_rejections",
                                           "requests answered 503 by admission control", ["kind"],
                                           registry=self.registry)
        self.token_verifications = Gauge("picoiot_token_verifications",
                                         "JWT signatures checked since start (token cache misses)",
                                         registry=self.registry)
        self.requests_in_flight = Gauge("picoiot_requests_in_flight",
                                        "requests being worked on (long-polls and probes not counted)",
                                        registry=self.registry)
        self.offline_transitions = Counter("picoiot_device_offline_transitions", "devices that missed their TTL",
                                           registry=self.registry)
        self.fast_path = Counter("picoiot_fast_path_requests",
                                 "hot requests (plain heartbeats, /health) served by the fast path, or handed on "
                                 "to the full app (fallback)", ["route", "outcome"], registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe(self, method: str, route: str, status: int, start: float) -> None:
        """Count one answered request and its latency (since `start`, a perf_counter() reading).

        The labelled children are looked up once per (method, route, status): `labels()` costs a lock and a tuple
        build per call, on every request."""
        key = (method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
        pair[0].inc()
        pair[1].observe(time.perf_counter() - start)


class MetricsAndLimits:
    """Pure ASGI middleware (no per-request task like BaseHTTPMiddleware): cheap enough for the heartbeat path."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        max_body = self.max_body
        length = _content_length(scope)
        if length is not None and length > max_body:
            await _too_large(send, max_body)
            self._observe(scope, 413, start)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_body:
                    raise _BodyTooLarge()
            return message

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:
            if status == 500:  # nothing sent yet
                status = 413
                await _too_large(send, max_body)
        finally:
            self._observe(scope, status, start)

    def _observe(self, scope, status: int, start: float) -> None:
        route = scope.get("route")
        self.metrics.observe(scope["method"], getattr(route, "path", None) or "unmatched", status, start)


class _BodyTooLarge(HTTPException):
    # an HTTPException so FastAPI's body parser re-raises it (other errors become a generic 400)
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _too_large(send, max_body: int) -> None:
    body = json.dumps({"error": "request body too large", "detail": {"max_bytes": max_body}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
