"""Alarms' routes: a device's batch of alarms, and the operators' list and acknowledgement (data: alarms.py)."""
from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request

from .alarms import ack, ingest, list_alarms
from .auth import own_device_ns, require_ns, require_role
from .deps import CP, Caller
from .models import INT32, AlarmBatchIn, AlarmBatchOut, AlarmList, AlarmOut, ErrorBody

_ERR = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 400: {"model": ErrorBody}}
router = APIRouter(tags=["alarms"])


@router.post("/api/v1/devices/{device_id}/alarms", response_model=AlarmBatchOut, responses=_ERR)
async def post_alarms(device_id: str, body: AlarmBatchIn, p: Caller, cp: CP) -> AlarmBatchOut:
    """A device reports a batch of alarms (dedup by key; retries are idempotent)."""
    ns = own_device_ns(p, device_id, "report alarms")
    n = await cp.write(ingest, ns, device_id, body.alarms)
    return AlarmBatchOut(accepted=n)


@router.get("/api/v1/namespaces/{ns}/alarms", response_model=AlarmList, responses=_ERR)
async def get_alarms(ns: str, request: Request, p: Caller, cp: CP,
                     state: str | None = Query(None, pattern="^(firing|resolved)$"),
                     severity: str | None = Query(None, pattern="^(info|warning|error|critical)$"),
                     device: str | None = Query(None, max_length=64), key: str | None = Query(None, max_length=128),
                     acked: bool | None = None, limit: int = Query(200, ge=1, le=1000)) -> AlarmList:
    """List alarms, newest first; filter by state, severity, device, key, acknowledged."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    rows = await cp.read(list_alarms, ns, state, severity, device, key, acked, limit)
    return AlarmList(alarms=rows)


@router.post("/api/v1/namespaces/{ns}/alarms/{alarm_id}/ack", response_model=AlarmOut, responses=_ERR)
async def ack_alarm(ns: str, request: Request, p: Caller, cp: CP, alarm_id: int = Path(ge=1, le=INT32)) -> AlarmOut:
    """Acknowledge an alarm (operator). Idempotent; a new firing episode re-arms it."""
    require_ns(p, ns, request)
    require_role(p, "operator")
    return await cp.write(ack, ns, alarm_id, p.sub)
