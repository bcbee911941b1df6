"""The dashboard's Server-Sent Events stream: a namespace's changes from the hub (events.py), pushed to the browser.

Every `ui_tick_s` a `tick` lets the fleet page re-read the heartbeat figures, which change too often to be events of
their own (2,000 heartbeats/s at fleet scale).
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
