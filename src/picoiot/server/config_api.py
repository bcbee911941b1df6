"""ConfigurationServer's routes: a device's effective config (ETag, blocking read) and its apply/refuse report
(data: config.py)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse

from .auth import device_ns, own_device_ns
from .config import latest, save_report
from .deps import CP, Caller
from .errors import ApiError
from .longpoll import parse_etag, wait_for_change
from .models import ConfigOut, ConfigReportIn, ErrorBody, Ok


_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409)}
router = APIRouter(tags=["config"])


@router.get("/api/v1/devices/{device_id}/config", response_model=ConfigOut,
            responses={**_ERR, 304: {"description": "not modified (If-None-Match, or the wait ended unchanged)"}})
async def get_config(device_id: str, p: Caller, cp: CP,
                     version: int | None = Query(None, ge=0, le=2**31 - 1),
                     wait: float | None = Query(None, ge=0, le=86400),
                     if_none_match: str | None = Header(None)) -> Response:
    """The device's effective config. `?version=N&wait=S` blocks until the version differs from N (or S passes)."""
    ns = device_ns(p, device_id, "viewer")
    if await cp.versions_of(ns, device_id) is None:
        raise ApiError(404, "unknown device")

    async def fetch():
        return await cp.read(latest, ns, device_id)

    known = version if version is not None else parse_etag(if_none_match)
    if wait and version is not None:
        cur = await wait_for_change(cp, ns, device_id, min(wait, cp.settings.max_config_wait_s), "config", fetch,
                                    lambda c: c is not None and c[0] != version)
    else:
        cur = await fetch()
    if cur is None:
        raise ApiError(404, "no config yet: the device has no device type")
    etag = f'"{cur[0]}"'
    if known is not None and cur[0] == known:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse({"version": cur[0], "config": cur[1]}, headers={"ETag": etag})


@router.post("/api/v1/devices/{device_id}/config/report", response_model=Ok, responses=_ERR)
async def report_config(device_id: str, body: ConfigReportIn, p: Caller, cp: CP) -> Ok:
    """The device says which config version it applied or rejected (and why)."""
    ns = own_device_ns(p, device_id, "report their config")
    await cp.write(save_report, ns, device_id, body)
    return Ok()
