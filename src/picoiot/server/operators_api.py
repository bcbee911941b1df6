"""Operators' routes: namespaces, devices (list/get/patch/delete/provision), device types, groups, config overrides
(data: operators.py; OTA: ota_api.py)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request

from . import operators
from .auth import ALL_NAMESPACES, Principal, require_ns, require_role
from .config import set_overrides
from .deps import CP, Caller
from .devicetypes import check_schema
from .documents import SCHEMA_DEPTH, check_depth
from .errors import ApiError
from .models import (DeviceConfigOut, DeviceList, DeviceOut, DevicePatch, DeviceTypeIn, DeviceTypeList,
                     DeviceTypeOut, ErrorBody, GroupIn, GroupList, GroupOut, NamespaceIn, NamespaceList, Ok,
                     OverridesIn, ProvisionIn, ProvisionOut)

Name = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409)}
router = APIRouter(tags=["operators"])


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
@router.get("/api/v1/namespaces/{ns}/devices", response_model=DeviceList, responses=_ERR)
async def list_devices(ns: str, request: Request, p: Caller, cp: CP, online: bool | None = None,
                       device_type: str | None = Query(None, max_length=64),
                       group: str | None = Query(None, max_length=64), limit: int = Query(500, ge=1, le=5000),
                       offset: int = Query(0, ge=0, le=10**9)) -> DeviceList:
    """Devices of a namespace; filter by online, type, group."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    before = cp.liveness.unflushed_all()  # a flush may finish while we read
    rows = await cp.read(operators.list_devices, ns, online, device_type, group, limit, offset)
    return DeviceList(devices=[operators.device_out(r, operators.overlay(cp, r, before)) for r in rows])


@router.get("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=DeviceOut, responses=_ERR)
async def get_device(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> DeviceOut:
    """One device record."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    before = cp.liveness.unflushed(ns, device_id)  # a flush may finish while we read
    row = await cp.read(operators.get_device, ns, device_id)
    return operators.device_out(row, operators.overlay(cp, row) or before)


@router.post("/api/v1/namespaces/{ns}/devices", response_model=ProvisionOut, status_code=201,
             responses={**_ERR, 422: {"model": ErrorBody}})
async def provision(ns: str, body: ProvisionIn, request: Request, p: Caller, cp: CP) -> ProvisionOut:
    """Enroll a device: returns its key file content once (derived key, or a random individual key). Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    key = await cp.write(operators.provision, cp, ns, body, cp.settings.secrets.enrollment_key(ns))
    return ProvisionOut(device_id=body.device_id, device_key=key, namespace=ns,
                        service_discovery_url=f"{cp.base_url(request)}/api/devices")


@router.patch("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=DeviceOut,
              responses={**_ERR, 422: {"model": ErrorBody}})
async def patch_device(ns: str, device_id: str, body: DevicePatch, request: Request, p: Caller, cp: CP) -> DeviceOut:
    """Move a device to a group (null = none) or change its type. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    return operators.device_out(await cp.write(operators.patch_device, cp, ns, device_id, body))


@router.delete("/api/v1/namespaces/{ns}/devices/{device_id}", response_model=Ok, responses=_ERR)
async def delete_device(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> Ok:
    """Forget a device: record, config history, shadows and alarms. Its tokens stop working. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    await cp.write(operators.delete_device, ns, device_id)
    return Ok()


# ---------------------------------------------------------------- config (operators' view)
_CFG = "/api/v1/namespaces/{ns}/devices/{device_id}/config"


@router.get(_CFG, response_model=DeviceConfigOut, responses=_ERR)
async def get_device_config(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> DeviceConfigOut:
    """Effective config, the device's own overrides, its group and the device's last report."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    return await cp.read(operators.device_config, ns, device_id)


async def _set_overrides(request: Request, p: Principal, ns: str, dev: str, overrides: dict, patch: bool):
    require_ns(p, ns, request)
    require_role(p, "admin")
    cp = request.app.state.cp
    check_depth(overrides, cp.settings.max_doc_depth, "overrides")
    await cp.write(set_overrides, cp, ns, dev, overrides, patch)
    return await cp.read(operators.device_config, ns, dev)


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
@router.get("/api/v1/device-types", response_model=DeviceTypeList, responses=_ERR)
async def list_types(p: Caller, cp: CP) -> DeviceTypeList:
    """All device types with their JSON schema and default config."""
    require_role(p, "viewer")
    return DeviceTypeList(device_types=[operators.type_out(r) for r in await cp.read(operators.list_types)])


@router.get("/api/v1/device-types/{name}", response_model=DeviceTypeOut, responses=_ERR)
async def get_type(p: Caller, cp: CP, name: str = Name) -> DeviceTypeOut:
    """One device type."""
    require_role(p, "viewer")
    row = await cp.read(operators.type_row, name)
    if row is None:
        raise ApiError(404, "unknown device type")
    return operators.type_out(row)


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
    return operators.type_out(await cp.write(operators.put_type, cp, name, body))


# ---------------------------------------------------------------- groups
@router.get("/api/v1/namespaces/{ns}/groups", response_model=GroupList, responses=_ERR)
async def list_groups(ns: str, request: Request, p: Caller, cp: CP) -> GroupList:
    """Groups of a namespace with their config overrides."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    return GroupList(groups=[operators.group_out(r) for r in await cp.read(operators.list_groups, ns)])


@router.put("/api/v1/namespaces/{ns}/groups/{name}", response_model=GroupOut,
            responses={**_ERR, 422: {"model": ErrorBody}})
async def put_group(ns: str, body: GroupIn, request: Request, p: Caller, cp: CP, name: str = Name) -> GroupOut:
    """Create or replace a group's config overrides; refused (422) if any member's config would be invalid. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    check_depth(body.overrides, cp.settings.max_doc_depth, "overrides")
    return operators.group_out(await cp.write(operators.put_group, cp, ns, name, body.overrides))


@router.delete("/api/v1/namespaces/{ns}/groups/{name}", response_model=Ok, responses=_ERR)
async def delete_group(ns: str, request: Request, p: Caller, cp: CP, name: str = Name) -> Ok:
    """Delete a group; its members fall back to type defaults ⊕ their own overrides. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    await cp.write(operators.delete_group, cp, ns, name)
    return Ok()
