"""OTA's routes (docs/ota.md): the publisher's key, files, releases and assignments, the fleet's status, and the
device's offer, manifest, file chunks and report (data: ota.py)."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from . import ota
from .auth import device_ns, own_device_ns, require_ns, require_role
from .deps import CP, Caller
from .errors import ApiError
from .models import ErrorBody
from .ota import HEX64, MAX_CHUNK, MAX_FILE_BYTES, AssignIn, KeyIn, ReleaseIn, ReportIn
from .rollouts import note_download

router = APIRouter(tags=["ota"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 422)}


# ---------------------------------------------------------------- publisher / operator side
@router.put("/api/v1/namespaces/{ns}/ota/key", responses=_ERR)
async def put_key(ns: str, body: KeyIn, request: Request, p: Caller, cp: CP) -> dict:
    """Set the public key releases of this namespace must be signed with. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    await cp.write(ota.put_key, ns, body.public_key)
    return {"public_key": body.public_key}


@router.put("/api/v1/namespaces/{ns}/ota/files/{sha256}", responses=_ERR)
async def put_file(ns: str, sha256: str, request: Request, p: Caller, cp: CP) -> dict:
    """Upload one release file (raw body, ≤ 64 KiB); its name is its sha256, checked. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    if not re.match(HEX64, sha256):
        raise ApiError(400, "file name must be its sha256 (64 lowercase hex)")
    data = await request.body()
    if len(data) > MAX_FILE_BYTES:
        raise ApiError(413, f"file larger than {MAX_FILE_BYTES} bytes")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ApiError(422, "sha256 mismatch", {"expected": sha256, "got": hashlib.sha256(data).hexdigest()})
    await cp.write(ota.put_file, ns, sha256, data)
    return {"sha256": sha256, "size": len(data)}


@router.post("/api/v1/namespaces/{ns}/ota/releases", status_code=201, responses=_ERR)
async def publish(ns: str, body: ReleaseIn, request: Request, p: Caller, cp: CP) -> dict:
    """Store a signed release whose files are uploaded. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    m = ota.check_manifest(body.manifest)
    created = await cp.write(ota.publish, ns, body, m)
    return {"version": m["version"], "files": len(m["files"]), "created": created}


@router.get("/api/v1/namespaces/{ns}/ota/releases", responses=_ERR)
async def list_releases(ns: str, request: Request, p: Caller, cp: CP) -> dict:
    require_ns(p, ns, request)
    require_role(p, "viewer")
    return {"releases": await cp.read(ota.releases, ns)}


@router.put("/api/v1/namespaces/{ns}/ota/assignments", responses=_ERR)
async def assign(ns: str, body: AssignIn, request: Request, p: Caller, cp: CP) -> dict:
    """Assign a release to one device or a group (a device's own assignment wins). Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    if (body.device is None) == (body.group is None):
        raise ApiError(422, "give exactly one of device, group", {"path": "device"})
    await cp.write(ota.assign, ns, body)
    ota.assignments_changed(cp, ns)
    return {"ok": True}


@router.get("/api/v1/namespaces/{ns}/ota/status", responses=_ERR)
async def status(ns: str, request: Request, p: Caller, cp: CP,
                 device: str | None = Query(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")) -> dict:
    """Per device: assigned release, running version, pending offer, last report."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    devices = await cp.read(ota.status, ns, device)
    if device and not devices:
        raise ApiError(404, "unknown device")
    return {"devices": devices}


# ---------------------------------------------------------------- device side
@router.get("/api/v1/devices/{device_id}/ota", status_code=200, responses={**_ERR, 204: {"description": "none"}})
async def offer(device_id: str, request: Request, p: Caller, cp: CP) -> Response:
    """The release the device should install: `204` when none, else `{version, manifest_url, files_url}`."""
    ns = device_ns(p, device_id, "viewer")
    view = await cp.read(ota.device_view, ns, device_id)
    if view is None:
        raise ApiError(404, "unknown device")
    if not view["pending"]:
        return Response(status_code=204)
    base = f"{cp.base_url(request)}/api/v1/devices/{device_id}/ota"
    body = {"version": view["pending"], "manifest_url": f"{base}/releases/{view['pending']}/manifest",
            "files_url": f"{base}/files"}
    return Response(json.dumps(body), media_type="application/json")


@router.get("/api/v1/devices/{device_id}/ota/releases/{version}/manifest", responses=_ERR)
async def manifest(device_id: str, version: str, p: Caller, cp: CP,
                   raw: bool = Query(False)) -> Any:
    """The signed manifest text and its signature (the device verifies the exact text). raw: the manifest's exact
    bytes as the body (itself a JSON object) and the signature in `X-Manifest-Signature`, so that a device holds the
    manifest once instead of parsing it out of a document."""
    ns = device_ns(p, device_id, "viewer")
    row = await cp.read(ota.release, ns, version)
    if row is None:
        raise ApiError(404, "unknown release")
    if p.is_device:
        await cp.write(note_download, ns, device_id, version)  # a rollout follows its devices' progress
    if raw:
        return Response(row[0].encode(), media_type="application/json", headers={"X-Manifest-Signature": row[1]})
    return {"version": version, "manifest": row[0], "signature": row[1]}


@router.get("/api/v1/devices/{device_id}/ota/files/{sha256}", responses=_ERR)
async def file_chunk(device_id: str, sha256: str, p: Caller, cp: CP,
                     offset: int = Query(0, ge=0), length: int = Query(MAX_CHUNK, ge=1, le=MAX_CHUNK)) -> Response:
    """Bytes [offset, offset+length) of a release file (a device downloads in small requests)."""
    ns = device_ns(p, device_id, "viewer")
    data = await cp.read(ota.file_data, ns, sha256)
    if data is None:
        raise ApiError(404, "unknown file")
    if offset > len(data):
        raise ApiError(416, "offset beyond the end of the file", {"size": len(data)})
    return Response(data[offset:offset + length], media_type="application/octet-stream",
                    headers={"X-File-Size": str(len(data))})


@router.post("/api/v1/devices/{device_id}/ota/report", responses=_ERR)
async def report(device_id: str, body: ReportIn, p: Caller, cp: CP) -> dict:
    """The device's install result: installed, rolled_back (with the version it runs again) or failed."""
    ns = own_device_ns(p, device_id, "report OTA results")
    await cp.write(ota.save_report, ns, device_id, body)
    return {"ok": True}
