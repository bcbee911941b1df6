"""Operators' API: devices, provisioning, device types, groups, config overrides, namespaces (OTA: ota.py)."""
from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request

from . import changes
from . import db as tables
from .auth import ALL_NAMESPACES, Principal, derive_device_key, require_ns, require_role
from .config import device_row, latest, recompute, recompute_where, set_overrides
from .db import now_ms
from .deps import CP, Caller
from .devicetypes import check_schema, validate_config
from .discovery import ttl_for
from .documents import SCHEMA_DEPTH, check_depth
from .errors import ApiError
from .liveness import decoded
from .models import (ConfigReport, DeviceConfigOut, DeviceList, DeviceOut, DevicePatch, DeviceTypeIn,
                     DeviceTypeList, DeviceTypeOut, ErrorBody, GroupIn, GroupList, GroupOut, NamespaceIn,
                     NamespaceList, Ok, OverridesIn, ProvisionIn, ProvisionOut)
from .refusals import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

D, C, TY, G, S, A = (tables.devices, tables.device_configs, tables.device_types, tables.groups, tables.shadows,
                     tables.alarms)
Name = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409)}
router = APIRouter(tags=["operators"])


def _cp(request: Request) -> "ControlPlane":
    return request.app.state.cp


def device_out(row, overlay: tuple[int, dict | None] | None = None) -> DeviceOut:
    last_seen, hb = row["last_seen"], row["heartbeat"]
    if overlay is not None:  # unflushed heartbeat held in memory by this process
        last_seen, hb = max(last_seen or 0, overlay[0]), overlay[1] or hb
    return DeviceOut(namespace=row["ns"], device_id=row["device_id"], device_type=row["device_type"],
                     group=row["group_name"], firmware=row["firmware"], capabilities=row["capabilities"] or [],
                     address=row["address"], reset_cause=row["reset_cause"], online=row["online"],
                     ttl_s=row["ttl_s"], created_ts=row["created_ts"], first_seen=row["first_seen"],
                     last_seen=last_seen, registered_ts=row["registered_ts"], config_version=row["config_version"],
                     key_mode="individual" if row["device_key"] else "derived", heartbeat=hb,
                     config_report=ConfigReport(**row["config_report"]) if row["config_report"] else None)


def _overlay(cp: "ControlPlane", row, before=None):
    key = (row["ns"], row["device_id"])
    return cp.liveness.unflushed(*key) or (decoded(before.get(key)) if before else None)


# ---------------------------------------------------------------- namespaces
@router.get("/api/v1/namespaces", response_model=NamespaceList, responses=_ERR)
async def list_namespaces(p: Caller, cp: CP) -> NamespaceList:
    """Namespaces the caller can see."""
    require_role(p, "viewer")
    names = cp.settings.secrets.namespaces()
    return NamespaceList(namespaces=names if p.ns == ALL_NAMESPACES else [n for n in names if n == p.ns])


@router.post("/api/v1/namespaces", response_model=NamespaceList, status_code=201, responses=_ERR)
async def create_namespace(body: NamespaceIn, p: Caller, cp: CP) -> NamespaceList:
    """Create a namespace (its enrollment key is generated and stored with the server's secrets). Global admin."""
    require_role(p, "admin")
    if p.ns != ALL_NAMESPACES:
        raise ApiError(403, "creating namespaces needs an admin token for all namespaces (ns '*')")
    if not cp.settings.secrets.add_namespace(body.name):
        raise ApiError(409, "namespace exists")
    return NamespaceList(namespaces=[body.name])


# ---------------------------------------------------------------- devices
def _list_devices(conn, ns, online, dtype, group, limit, offset):
    q = sa.select(D).where(D.c.ns == ns)
    if online is not None:
        q = q.where(D.c.online.is_(online))
    if dtype:
        q = q.where(D.c.device_type == dtype)
    if group:
        q = q.where(D.c.group_name == group)
    return list(conn.execute(q.order_by(D.c.device_id).limit(limit).offset(offset)).mappings())


@router.get("/api/v1/namespaces/{ns}/devices", response_model=DeviceList, responses=_ERR)
async def list_devices(ns: str, request: Request, p: Caller, cp: CP, online: bool | None = None,
                       device_type: str | None = Query(None, max_length=64),
                       group: str | None = Query(None, max_length=64), limit: int = Query(500, ge=1, le=5000),
                       offset: int = Query(0, ge=0, le=10**9)) -> DeviceList:
    """Devices of a namespace; filter by online, type, group."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    before = cp.liveness.unflushed_all()  # a flush may finish while we read
    rows = await cp.read(_list_devices, ns, online, device_type, group, limit, offset)
    return DeviceList(devices=[device_out(r, _overlay(cp, r, before)) for r in rows])


def _get_device(conn, ns, dev):
    row = device_row(conn, ns, dev)
    if row is None:
        raise NotFound("unknown device")
    return row


@router.get("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=DeviceOut, responses=_ERR)
async def get_device(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> DeviceOut:
    """One device record."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    before = cp.liveness.unflushed(ns, device_id)  # a flush may finish while we read
    row = await cp.read(_get_device, ns, device_id)
    return device_out(row, _overlay(cp, row) or before)


def _provision(conn, events, cp: "ControlPlane", ns: str, body: ProvisionIn, enrollment_key: str):
    if device_row(conn, ns, body.device_id) is not None:
        raise Conflict("device exists")
    if body.device_type is not None and conn.execute(sa.select(TY.c.name).where(TY.c.name == body.device_type)) \
            .first() is None:
        raise Invalid(f"unknown device type {body.device_type!r}", {"path": "device_type"})
    individual = secrets.token_hex(32) if body.key_mode == "individual" else None
    now = now_ms()
    conn.execute(D.insert().values(ns=ns, device_id=body.device_id, device_type=body.device_type,
                                   group_name=body.group, device_key=individual, capabilities=[], created_ts=now,
                                   online=False, ttl_s=ttl_for(cp.settings, cp.settings.default_heartbeat_s),
                                   config_overrides={}, config_version=0))
    if body.device_type:
        recompute(conn, events, cp, ns, body.device_id)
    events.emit(conn, changes.provisioned(ns, body.device_id))
    return individual or derive_device_key(enrollment_key, body.device_id)


@router.post("/api/v1/namespaces/{ns}/devices", response_model=ProvisionOut, status_code=201,
             responses={**_ERR, 422: {"model": ErrorBody}})
async def provision(ns: str, body: ProvisionIn, request: Request, p: Caller, cp: CP) -> ProvisionOut:
    """Enroll a device: returns its key file content once (derived key, or a random individual key). Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    key = await cp.write(_provision, cp, ns, body, cp.settings.secrets.enrollment_key(ns))
    return ProvisionOut(device_id=body.device_id, device_key=key, namespace=ns,
                        service_discovery_url=f"{cp.base_url(request)}/api/devices")


def _patch_device(conn, events, cp, ns, dev, body: DevicePatch):
    row = device_row(conn, ns, dev, lock=True)
    if row is None:
        raise NotFound("unknown device")
    values: dict[str, Any] = {}
    if "group" in body.model_fields_set:
        values["group_name"] = body.group
    if "device_type" in body.model_fields_set:
        if body.device_type and conn.execute(sa.select(TY.c.name).where(TY.c.name == body.device_type)).first() \
                is None:
            raise Invalid(f"unknown device type {body.device_type!r}", {"path": "device_type"})
        values["device_type"] = body.device_type
    if values:
        conn.execute(D.update().where(D.c.ns == ns, D.c.device_id == dev).values(**values))
        recompute(conn, events, cp, ns, dev)  # 422 here rolls the whole change back
    return device_row(conn, ns, dev)


@router.patch("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=DeviceOut,
              responses={**_ERR, 422: {"model": ErrorBody}})
async def patch_device(ns: str, device_id: str, body: DevicePatch, request: Request, p: Caller, cp: CP) -> DeviceOut:
    """Move a device to a group (null = none) or change its type. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    return device_out(await cp.write(_patch_device, cp, ns, device_id, body))


def _delete_device(conn, events, cp, ns, dev):
    if conn.execute(D.delete().where(D.c.ns == ns, D.c.device_id == dev)).rowcount != 1:
        raise NotFound("unknown device")
    for t in (C, S, A):
        conn.execute(t.delete().where(t.c.ns == ns, t.c.device_id == dev))
    events.emit(conn, changes.deleted(ns, dev))


@router.delete("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=Ok, responses=_ERR)
async def delete_device(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> Ok:
    """Forget a device: record, config history, shadows and alarms. Its tokens stop working. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    await cp.write(_delete_device, cp, ns, device_id)
    return Ok()


# ---------------------------------------------------------------- config (operators' view)
def _device_config(conn, ns, dev) -> DeviceConfigOut:
    row = _get_device(conn, ns, dev)
    cur = latest(conn, ns, dev)
    return DeviceConfigOut(version=cur[0] if cur else 0, config=cur[1] if cur else {},
                           overrides=row["config_overrides"] or {}, group=row["group_name"],
                           device_type=row["device_type"],
                           report=ConfigReport(**row["config_report"]) if row["config_report"] else None)


_CFG = "/api/v1/namespaces/{ns}/devices/{device_id}/config"


@router.get(_CFG, response_model=DeviceConfigOut, responses=_ERR)
async def get_device_config(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> DeviceConfigOut:
    """Effective config, the device's own overrides, its group and the device's last report."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    return await cp.read(_device_config, ns, device_id)


async def _set_overrides(request: Request, p: Principal, ns: str, dev: str, overrides: dict, patch: bool):
    require_ns(p, ns, request)
    require_role(p, "admin")
    cp = _cp(request)
    check_depth(overrides, cp.settings.max_doc_depth, "overrides")
    await cp.write(set_overrides, cp, ns, dev, overrides, patch)
    return await cp.read(_device_config, ns, dev)


@router.put(_CFG, response_model=DeviceConfigOut, responses={**_ERR, 422: {"model": ErrorBody}})
async def put_device_config(ns: str, device_id: str, body: OverridesIn, request: Request, p: Caller) -> DeviceConfigOut:
    """Replace the device's overrides. A result that fails the type's schema is refused (422) and not stored."""
    return await _set_overrides(request, p, ns, device_id, body.overrides, patch=False)


@router.patch(_CFG, response_model=DeviceConfigOut, responses={**_ERR, 422: {"model": ErrorBody}})
async def patch_device_config(ns: str, device_id: str, body: OverridesIn, request: Request,
                              p: Caller) -> DeviceConfigOut:
    """Deep-merge into the device's overrides (null removes a key). Refused (422) if the result is invalid."""
    return await _set_overrides(request, p, ns, device_id, body.overrides, patch=True)


# ---------------------------------------------------------------- device types (global)
def _type_out(r) -> DeviceTypeOut:
    return DeviceTypeOut(name=r["name"], json_schema=r["json_schema"], defaults=r["defaults"], version=r["version"],
                         updated_ts=r["updated_ts"])


@router.get("/api/v1/device-types", response_model=DeviceTypeList, responses=_ERR)
async def list_types(p: Caller, cp: CP) -> DeviceTypeList:
    """All device types with their JSON schema and default config."""
    require_role(p, "viewer")
    rows = await cp.read(lambda conn: list(conn.execute(sa.select(TY).order_by(TY.c.name)).mappings()))
    return DeviceTypeList(device_types=[_type_out(r) for r in rows])


@router.get("/api/v1/device-types/{name}", response_model=DeviceTypeOut, responses=_ERR)
async def get_type(p: Caller, cp: CP, name: str = Name) -> DeviceTypeOut:
    """One device type."""
    require_role(p, "viewer")
    row = await cp.read(lambda conn: conn.execute(sa.select(TY).where(TY.c.name == name)).mappings().first())
    if row is None:
        raise ApiError(404, "unknown device type")
    return _type_out(row)


def _put_type(conn, events, cp, name: str, body: DeviceTypeIn):
    validate_config(body.json_schema, body.defaults)
    row = conn.execute(sa.select(TY).where(TY.c.name == name).with_for_update()).mappings().first()
    now = now_ms()
    version = (row["version"] + 1) if row else 1
    candidate = {"name": name, "json_schema": body.json_schema, "defaults": body.defaults}
    if row is None:
        conn.execute(TY.insert().values(version=version, updated_ts=now, **candidate))
    else:
        conn.execute(TY.update().where(TY.c.name == name).values(version=version, updated_ts=now,
                                                                  json_schema=body.json_schema,
                                                                  defaults=body.defaults))
    recompute_where(conn, events, cp, D.c.device_type == name, type_override=candidate)
    return conn.execute(sa.select(TY).where(TY.c.name == name)).mappings().first()


@router.put("/api/v1/device-types/{name}", response_model=DeviceTypeOut,
            responses={**_ERR, 422: {"model": ErrorBody}})
async def put_type(body: DeviceTypeIn, p: Caller, cp: CP, name: str = Name) -> DeviceTypeOut:
    """Create or replace a device type (schema + defaults); every device of the type gets a new config version if
    its effective config changes. Refused (422) if the schema is invalid, the defaults fail it, or any device's
    resulting config would. Global admin."""
    require_role(p, "admin")
    if p.ns != ALL_NAMESPACES:
        raise ApiError(403, "device types are shared by all namespaces: needs an admin token with ns '*'")
    check_schema(body.json_schema)
    check_depth(body.defaults, cp.settings.max_doc_depth, "defaults")
    check_depth(body.json_schema, SCHEMA_DEPTH, "json_schema")
    return _type_out(await cp.write(_put_type, cp, name, body))


# ---------------------------------------------------------------- groups
def _group_out(r) -> GroupOut:
    return GroupOut(namespace=r["ns"], name=r["name"], overrides=r["overrides"], updated_ts=r["updated_ts"])


@router.get("/api/v1/namespaces/{ns}/groups", response_model=GroupList, responses=_ERR)
async def list_groups(ns: str, request: Request, p: Caller, cp: CP) -> GroupList:
    """Groups of a namespace with their config overrides."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    rows = await cp.read(
        lambda conn: list(conn.execute(sa.select(G).where(G.c.ns == ns).order_by(G.c.name)).mappings()))
    return GroupList(groups=[_group_out(r) for r in rows])


def _put_group(conn, events, cp, ns, name, overrides):
    row = conn.execute(sa.select(G).where(G.c.ns == ns, G.c.name == name).with_for_update()).first()
    now = now_ms()
    if row is None:
        conn.execute(G.insert().values(ns=ns, name=name, overrides=overrides, updated_ts=now))
    else:
        conn.execute(G.update().where(G.c.ns == ns, G.c.name == name).values(overrides=overrides, updated_ts=now))
    recompute_where(conn, events, cp, sa.and_(D.c.ns == ns, D.c.group_name == name), group_override=overrides)
    return conn.execute(sa.select(G).where(G.c.ns == ns, G.c.name == name)).mappings().first()


@router.put("/api/v1/namespaces/{ns}/groups/{name}", response_model=GroupOut,
            responses={**_ERR, 422: {"model": ErrorBody}})
async def put_group(ns: str, body: GroupIn, request: Request, p: Caller, cp: CP, name: str = Name) -> GroupOut:
    """Create or replace a group's config overrides; refused (422) if any member's config would be invalid. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    check_depth(body.overrides, cp.settings.max_doc_depth, "overrides")
    return _group_out(await cp.write(_put_group, cp, ns, name, body.overrides))


def _delete_group(conn, events, cp, ns, name):
    if conn.execute(G.delete().where(G.c.ns == ns, G.c.name == name)).rowcount != 1:
        raise NotFound("unknown group")
    members = [r[0] for r in conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.group_name == name))]
    conn.execute(D.update().where(D.c.ns == ns, D.c.group_name == name).values(group_name=None))
    if members:
        recompute_where(conn, events, cp, sa.and_(D.c.ns == ns, D.c.device_id.in_(members)))


@router.delete("/api/v1/namespaces/{ns}/groups/{name}", response_model=Ok, responses=_ERR)
async def delete_group(ns: str, request: Request, p: Caller, cp: CP, name: str = Name) -> Ok:
    """Delete a group; its members fall back to type defaults ⊕ their own overrides. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    await cp.write(_delete_group, cp, ns, name)
    return Ok()
