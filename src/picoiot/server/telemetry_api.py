"""Telemetry routes (thin: the work is in telemetry.py): a device's batch of readings, and the history query."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from .auth import own_device_ns, require_ns, require_role
from .db import now_ms
from .deps import CP, Caller
from .errors import ApiError
from .models import ErrorBody, TelemetryAccepted, TelemetryIn, TelemetryLatest, TelemetrySeries
from .telemetry import FIELD_RE, latest_from_db, query

router = APIRouter(tags=["telemetry"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 422, 429, 503)}



@router.post("/api/v1/devices/{device_id}/telemetry", response_model=TelemetryAccepted, status_code=202,
             responses=_ERR)
async def post_telemetry(device_id: str, body: TelemetryIn, p: Caller, cp: CP) -> TelemetryAccepted:
    """A device's batch of readings (at most 1,000). Accepted readings are written within `telemetry_flush_s`.
    A sensors device usually sends its readings on the heartbeat instead (`t`, docs/protocol.md)."""
    ns = own_device_ns(p, device_id, "send telemetry")
    if await cp.versions_of(ns, device_id) is None:
        raise ApiError(404, "unknown device")
    items = []
    for i, r in enumerate(body.readings):
        if len(r) != 3:
            cp.telemetry.refuse("bad_shape", len(body.readings))
            raise ApiError(422, "invalid reading", {"index": i, "reason": "bad_shape",
                                                    "message": "a reading is [field, ts, value]"})
        items.append((r[0], r[1], r[2]))
    return TelemetryAccepted(accepted=cp.telemetry.ingest(ns, device_id, items, strict=True))


_T = "/api/v1/namespaces/{ns}/devices/{device_id}/telemetry"
_TS = dict(ge=0, le=2**53)


@router.get(_T, response_model=TelemetrySeries, responses=_ERR)
async def get_telemetry(ns: str, device_id: str, request: Request, p: Caller, cp: CP,
                        field: str = Query(..., min_length=1, max_length=32, pattern=FIELD_RE.pattern),
                        since: int | None = Query(None, description="ms since the epoch; default until − 1 h", **_TS),
                        until: int | None = Query(None, description="ms since the epoch (exclusive); default now",
                                                  **_TS),
                        step: int | None = Query(None, ge=1, le=30 * 86400 * 1000, description=(
                            "bucket width, ms; default: about 1,000 points. Raised so that at most 5,000 points "
                            "come back; a whole number of minutes once the range leaves the raw retention"))
                        ) -> dict[str, Any]:
    """One field's history: raw readings (last 24 h by default) or the 1-minute min/max/mean aggregates (30 days),
    bucketed by `step`."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    now = now_ms()
    until = now if until is None else until
    since = until - 3600_000 if since is None else since
    if since >= until:
        raise ApiError(400, "since must be before until", {"since": since, "until": until})
    return await cp.read(query, ns, device_id, field, since, until, step, now,
                         cp.settings.telemetry_raw_retention_s * 1000)


@router.get(_T + "/latest", response_model=TelemetryLatest, responses=_ERR)
async def get_latest(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> TelemetryLatest:
    """The newest reading of each field (live values)."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    values = await cp.read(latest_from_db, ns, device_id, now_ms() - cp.settings.telemetry_raw_retention_s * 1000)
    for f, (ts, v) in cp.telemetry.latest_of(ns, device_id).items():
        if f not in values or values[f][0] <= ts:
            values[f] = (ts, v)
    return TelemetryLatest(values={f: [ts, v] for f, (ts, v) in values.items()})
