"""The heartbeat route (protocol §5); what it does is heartbeat.beat, shared with the fast path (hotpath.py), which
serves most heartbeats before this route is reached."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from .auth import own_device_ns
from .deps import CP, Caller
from .errors import ApiError
from .heartbeat import OTA_PATTERN, VERSION_MAX, WAIT_MAX_S, beat
from .models import ErrorBody, HeartbeatIn, HeartbeatOut

router = APIRouter(tags=["heartbeat"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404)}


@router.post("/api/v1/devices/{device_id}/heartbeat", response_model=HeartbeatOut, responses=_ERR)
async def heartbeat(device_id: str, body: HeartbeatIn, p: Caller, cp: CP,
                    wait: float | None = Query(None, ge=0, le=WAIT_MAX_S),
                    config_version: int | None = Query(None, ge=0, le=VERSION_MAX),
                    state_version: int | None = Query(None, ge=0, le=VERSION_MAX),
                    ota: str | None = Query(None, pattern=OTA_PATTERN)) -> Response:
    """Record a sign of life; answer the current config/state versions and OTA offer. With `wait`, a long-poll for a
    change: it answers when the config or state version differs from the one the device already knows of
    (`config_version` / `state_version` in the query; default: the body's, the versions it runs), or the OTA offer
    from the one it knows of (`ota`, empty for none; default: the offer when the poll began)."""
    ns = own_device_ns(p, device_id, "send heartbeats")
    entry = await cp.versions_of(ns, device_id)
    if entry is None:
        raise ApiError(404, "unknown device")
    # not through response_model validation (the OpenAPI schema is still HeartbeatOut; tests check bodies against it)
    return Response(await beat(cp, ns, device_id, body, entry, wait, config_version, state_version, ota),
                    media_type="application/json")
