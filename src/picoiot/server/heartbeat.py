"""Heartbeats: proof of life for the device's watchdog, and the change notification (`pending`) — recorded, held
as a long-poll and answered here for the route (heartbeat_api.py) and the fast path (hotpath.py) alike."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .db import now_ms
from .longpoll import wait_for_change
from .models import HeartbeatIn
from .ota import heartbeat_pending
from .telemetry import readings_from_heartbeat
from .refusals import NotFound

if TYPE_CHECKING:
    from .core import ControlPlane, Versions



async def record(cp: "ControlPlane", ns: str, device_id: str, body: HeartbeatIn) -> str:
    """Record a heartbeat of a known device; raises NotFound if it is gone. Returns the heartbeat as stored
    (JSON text), for a second sign of life from the same request.

    Shared by the FastAPI route and the fast path (`hotpath.py`), so both record and count the same way."""
    hb = body.model_dump_json(exclude_none=True, exclude=_NOT_STORED)
    if not await cp.liveness.beat(ns, device_id, hb):
        raise NotFound("unknown device")
    cp.metrics.heartbeats.inc()
    if body.t:  # in memory only (telemetry.py): never delays the answer, never refuses the heartbeat
        cp.telemetry.ingest(ns, device_id, readings_from_heartbeat(body.t, now_ms()), strict=False)
    return hb


_NOT_STORED = {"t"}  # the readings go to the telemetry tables, not into devices.heartbeat


#: HeartbeatOut as bytes: the hottest answer, formatted rather than built as a dict and serialised (~5 µs)
_ANSWER = b'{"ack":%d,"server_time":%d,"ttl":%d,"pending":{"config_version":%d,"state_version":%d,"ota":%s}}'


_ASK = object()


async def answer(cp: "ControlPlane", ns: str, device_id: str, seq: int, entry: "Versions", ota: Any = _ASK) -> bytes:
    """The heartbeat answer (HeartbeatOut) as JSON bytes; shared by the FastAPI route and the fast path."""
    if ota is _ASK:
        ota = await heartbeat_pending(cp, ns, device_id)
    offer = b"null" if ota is None else json.dumps(ota).encode()
    return _ANSWER % (seq, now_ms(), entry.ttl_s, entry.config_version, entry.state_version, offer)


async def beat(cp: "ControlPlane", ns: str, device_id: str, body: HeartbeatIn, entry: "Versions",
               wait: float | None = None, config_version: int | None = None, state_version: int | None = None,
               ota: str | None = None) -> bytes:
    """Record a heartbeat of a device whose versions are `entry` and answer it (JSON bytes); with `wait`, hold the
    answer as a long-poll (see the route). Shared by the FastAPI route and the fast path (hotpath.py), which parse
    the same query to the same values."""
    hb = await record(cp, ns, device_id, body)
    if not wait:
        return await answer(cp, ns, device_id, body.seq, entry)

    # the device may know of a version it does not run yet (a fetch under way, a config it refused): a long-poll
    # compared with the body's versions would answer at once, again and again
    known_cv = body.config_version if config_version is None else config_version
    known_sv = body.state_version if state_version is None else state_version
    offer = await heartbeat_pending(cp, ns, device_id)
    known_ota = (ota or None) if ota is not None else offer

    def changed(v: tuple[Versions, str | None]) -> bool:
        versions, offer = v
        return ((known_cv is not None and versions.config_version != known_cv)
                or (known_sv is not None and versions.state_version != known_sv)
                or offer != known_ota)

    if not changed((entry, offer)):
        # never wait past half the TTL: the device must not look silent while we hold its request
        limit = min(wait, cp.settings.max_heartbeat_wait_s, entry.ttl_s / 2)

        async def fetch():
            return (await cp.versions_of(ns, device_id) or entry, await heartbeat_pending(cp, ns, device_id))

        entry, offer = await wait_for_change(cp, ns, device_id, limit, "heartbeat", fetch, changed)
        await cp.liveness.beat(ns, device_id, hb)
    return await answer(cp, ns, device_id, body.seq, entry, offer)


#: the long-poll's query parameters, as the route declares them (the fast path accepts a strict subset of these)
WAIT_MAX_S = 86400
VERSION_MAX = 2**31 - 1
OTA_PATTERN = r"^[A-Za-z0-9_.+-]{0,32}$"
