"""Server-Sent Events for the dashboard: a namespace's changes as they are committed, pushed to the browser.

The hub listens to the notifier (every process gets every change: locally, and from the others through PostgreSQL
LISTEN/NOTIFY) and to telemetry ingestion (readings this process received; the latest values are not sent across
processes), and fans them out to one bounded queue per open stream. A stream that falls behind gets a `resync`
(the page re-reads everything) instead of an unbounded queue. Every `ui_tick_s` a `tick` lets the fleet page re-read
the heartbeat figures, which change too often to be events of their own (2,000 heartbeats/s at fleet scale).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .auth import require_ns, require_role
from .deps import CP, Caller

#: kinds a browser is told about (the rest are internal bookkeeping)
KINDS = {"config", "state", "device", "online", "offline", "deleted", "alarm", "telemetry", "resync"}
QUEUE = 256


class EventHub:
    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue]] = {}

    def on_event(self, e: dict) -> None:
        if e.get("kind") == "resync":
            for qs in self._streams.values():
                for q in qs:
                    self._put(q, {"kind": "resync"})
            return
        if e.get("kind") not in KINDS:
            return
        out = {k: v for k, v in e.items() if k in ("ns", "dev", "kind", "version", "name", "values")}
        for q in self._streams.get(e["ns"], ()):
            self._put(q, out)

    def on_telemetry(self, ns: str, dev: str, values: dict) -> None:
        if ns in self._streams:
            self.on_event({"ns": ns, "dev": dev, "kind": "telemetry",
                           "values": {f: [ts, v] for f, (ts, v) in values.items()}})

    @staticmethod
    def _put(q: asyncio.Queue, e: dict) -> None:
        try:
            q.put_nowait(e)
        except asyncio.QueueFull:  # a slow reader: drop what it has not read, tell it to re-read everything
            while not q.empty():
                q.get_nowait()
            q.put_nowait({"kind": "resync"})

    def open(self, ns: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self._streams.setdefault(ns, set()).add(q)
        return q

    def close(self, ns: str, q: asyncio.Queue) -> None:
        qs = self._streams.get(ns)
        if qs is not None:
            qs.discard(q)
            if not qs:
                del self._streams[ns]

    def __len__(self) -> int:
        return sum(len(qs) for qs in self._streams.values())


router = APIRouter(tags=["events"])


# Not in the OpenAPI document: a stream, not a JSON answer (a generated request would hold it for ui_stream_s);
# documented in docs/dashboard.md.
@router.get("/api/v1/namespaces/{ns}/events", include_in_schema=False)
async def events(ns: str, request: Request, p: Caller, cp: CP) -> StreamingResponse:
    """`text/event-stream` of the namespace's changes: each `data:` is a JSON event {ns, dev, kind, …} with kind
    config, state, device, online, offline, deleted, alarm, telemetry (`values`: field → [ts, value]), resync or
    tick. A stream ends after `ui_stream_s`; EventSource reconnects by itself (`retry: 1000`)."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    q = cp.events.open(ns)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            end = time.monotonic() + cp.settings.ui_stream_s
            tick = cp.settings.ui_tick_s
            while (left := end - time.monotonic()) > 0:
                try:
                    e = await asyncio.wait_for(q.get(), min(tick, left))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    e = {"kind": "tick"}
                yield b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
        finally:
            cp.events.close(ns, q)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
