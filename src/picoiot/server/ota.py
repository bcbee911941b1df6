"""OTA service (docs/ota.md): signed releases, assignment to devices/groups, the device's offer, manifest, files, reports.

The server never signs: the publisher signs the manifest offline with Ed25519; the server checks the signature against
the namespace's public key before it stores a release (so a bad upload is refused early), and the device checks it
again with the key in its own flash (the server is not trusted with code).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pydantic import BaseModel, Field

from . import changes
from .changes import Events
from . import db as tables
from .auth import device_ns, own_device_ns, require_ns, require_role
from .db import now_ms
from .deps import CP, Caller
from .errors import ApiError
from .models import ErrorBody
from .refusals import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

router = APIRouter(tags=["ota"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 422)}
K, F, R, AS, REP, D = (tables.ota_keys, tables.ota_files, tables.ota_releases, tables.ota_assignments,
                       tables.ota_reports, tables.devices)
HEX64 = r"^[0-9a-f]{64}$"
VERSION = r"^[A-Za-z0-9_.+-]{1,32}$"
PATH_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
#: limits shared with the firmware (iotlib.ota.OTAUpdateManager)
MAX_FILE_BYTES = 64 * 1024
MAX_FILES = 48
MAX_MANIFEST_BYTES = 8 * 1024
MAX_CHUNK = 16 * 1024


class KeyIn(BaseModel):
    public_key: str = Field(pattern=HEX64, description="Ed25519 public key, 64 lowercase hex chars")


class ReleaseIn(BaseModel):
    manifest: str = Field(max_length=MAX_MANIFEST_BYTES, description="the exact signed manifest text (JSON)")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class AssignIn(BaseModel):
    version: str | None = Field(pattern=VERSION, description="release to run; null removes the assignment")
    device: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ReportIn(BaseModel):
    version: str = Field(pattern=VERSION)
    status: str = Field(pattern=r"^(installed|rolled_back|failed)$")
    reason: str | None = Field(None, max_length=256)
    running: str | None = Field(None, max_length=32)



def check_manifest(text: str) -> dict:
    """The parsed manifest, or Invalid naming what is wrong (same rules as the firmware)."""
    try:
        m = json.loads(text)
    except ValueError:
        raise Invalid("manifest is not JSON")
    if not isinstance(m, dict) or not isinstance(m.get("version"), str) or not re.match(VERSION, m["version"]):
        raise Invalid("manifest: bad version", {"path": "version"})
    files = m.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise Invalid(f"manifest: files must be a list of 1-{MAX_FILES} entries", {"path": "files"})
    seen = set()
    for i, f in enumerate(files):
        p = f.get("path") if isinstance(f, dict) else None
        if (not isinstance(p, str) or len(p) > 64 or not PATH_RE.match(p) or ".." in p or p.startswith("ota")
                or p in seen):
            raise Invalid("manifest: bad path", {"path": f"files.{i}.path"})
        if not isinstance(f.get("sha256"), str) or not re.match(HEX64, f["sha256"]):
            raise Invalid("manifest: bad sha256", {"path": f"files.{i}.sha256"})
        size = f.get("size")
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise Invalid(f"manifest: size must be 0-{MAX_FILE_BYTES}", {"path": f"files.{i}.size"})
        seen.add(p)
    return m


# ---------------------------------------------------------------- publisher / operator side
@router.put("/api/v1/namespaces/{ns}/ota/key", responses=_ERR)
async def put_key(ns: str, body: KeyIn, request: Request, p: Caller, cp: CP) -> dict:
    """Set the public key releases of this namespace must be signed with. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")

    def put(conn, events):
        conn.execute(K.delete().where(K.c.ns == ns))
        conn.execute(K.insert().values(ns=ns, public_key=body.public_key, updated_ts=now_ms()))
    await cp.write(put)
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

    def put(conn, events):
        if conn.execute(sa.select(F.c.size).where(F.c.ns == ns, F.c.sha256 == sha256)).first() is None:
            conn.execute(F.insert().values(ns=ns, sha256=sha256, size=len(data), data=data))
    await cp.write(put)
    return {"sha256": sha256, "size": len(data)}


def _publish(conn, events, ns: str, body: ReleaseIn, m: dict):
    key = conn.execute(sa.select(K.c.public_key).where(K.c.ns == ns)).scalar()
    if key is None:
        raise Conflict("no OTA public key set for this namespace (PUT …/ota/key)")
    try:
        VerifyKey(bytes.fromhex(key)).verify(body.manifest.encode(), bytes.fromhex(body.signature))
    except BadSignatureError:
        raise Invalid("bad signature", {"path": "signature"})
    for i, f in enumerate(m["files"]):
        size = conn.execute(sa.select(F.c.size).where(F.c.ns == ns, F.c.sha256 == f["sha256"])).scalar()
        if size is None:
            raise Invalid(f"file not uploaded: {f['path']}", {"path": f"files.{i}.sha256"})
        if size != f["size"]:
            raise Invalid(f"size mismatch for {f['path']}", {"path": f"files.{i}.size"})
    old = conn.execute(sa.select(R.c.manifest, R.c.signature).where(R.c.ns == ns, R.c.version == m["version"])).first()
    if old is not None:
        if old[0] == body.manifest:
            return False  # the same release again (retry)
        raise Conflict(f"release {m['version']} exists with another manifest")
    conn.execute(R.insert().values(ns=ns, version=m["version"], manifest=body.manifest, signature=body.signature,
                                   created_ts=now_ms()))
    return True


@router.post("/api/v1/namespaces/{ns}/ota/releases", status_code=201, responses=_ERR)
async def publish(ns: str, body: ReleaseIn, request: Request, p: Caller, cp: CP) -> dict:
    """Store a signed release whose files are uploaded. Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    m = check_manifest(body.manifest)
    created = await cp.write(_publish, ns, body, m)
    return {"version": m["version"], "files": len(m["files"]), "created": created}


@router.get("/api/v1/namespaces/{ns}/ota/releases", responses=_ERR)
async def list_releases(ns: str, request: Request, p: Caller, cp: CP) -> dict:
    require_ns(p, ns, request)
    require_role(p, "viewer")

    def q(conn):
        return [{"version": r[0], "created_ts": r[1]} for r in
                conn.execute(sa.select(R.c.version, R.c.created_ts).where(R.c.ns == ns).order_by(R.c.created_ts))]
    return {"releases": await cp.read(q)}


def assignment_changed(cp: "ControlPlane", conn: sa.Connection, events: Events, ns: str, kind: str, target: str) -> None:
    """Wake the held heartbeats of the devices an assignment concerns, in every process: the offer reaches a device
    at once, not at its next heartbeat. Other processes also learn that the namespace now has assignments (core.py
    listens for these events). One event per device of a group: assignments are rare, and a woken poll that finds
    nothing new for itself goes back to waiting."""
    if kind == "device":
        devs = [target]
    else:
        devs = [r[0] for r in conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.group_name == target))]
    for dev in devs:
        events.emit(conn, changes.ota(ns, dev))


def _assign(conn, events, cp: "ControlPlane", ns: str, body: AssignIn):
    kind, target = ("device", body.device) if body.device else ("group", body.group)
    if kind == "device":
        if conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.device_id == target)).first() is None:
            raise NotFound("unknown device")
    elif conn.execute(sa.select(tables.groups.c.name).where(tables.groups.c.ns == ns,
                                                            tables.groups.c.name == target)).first() is None:
        raise NotFound("unknown group")
    if body.version is not None and conn.execute(
            sa.select(R.c.version).where(R.c.ns == ns, R.c.version == body.version)).first() is None:
        raise NotFound("unknown release", {"version": body.version})
    conn.execute(AS.delete().where(AS.c.ns == ns, AS.c.kind == kind, AS.c.target == target))
    if body.version is not None:
        conn.execute(AS.insert().values(ns=ns, kind=kind, target=target, version=body.version, assigned_ts=now_ms()))
    assignment_changed(cp, conn, events, ns, kind, target)


@router.put("/api/v1/namespaces/{ns}/ota/assignments", responses=_ERR)
async def assign(ns: str, body: AssignIn, request: Request, p: Caller, cp: CP) -> dict:
    """Assign a release to one device or a group (a device's own assignment wins). Admin."""
    require_ns(p, ns, request)
    require_role(p, "admin")
    if (body.device is None) == (body.group is None):
        raise ApiError(422, "give exactly one of device, group", {"path": "device"})
    await cp.write(_assign, cp, ns, body)
    assignments_changed(cp, ns)
    return {"ok": True}


def _device_view(conn, ns: str, dev: str) -> dict | None:
    row = conn.execute(sa.select(D.c.group_name, D.c.firmware, D.c.heartbeat)
                       .where(D.c.ns == ns, D.c.device_id == dev)).first()
    if row is None:
        return None
    group, firmware, hb = row
    assigned = conn.execute(sa.select(AS.c.version, AS.c.assigned_ts).where(
        AS.c.ns == ns, AS.c.kind == "device", AS.c.target == dev)).first()
    if assigned is None and group:
        assigned = conn.execute(sa.select(AS.c.version, AS.c.assigned_ts).where(
            AS.c.ns == ns, AS.c.kind == "group", AS.c.target == group)).first()
    rep = conn.execute(sa.select(REP).where(REP.c.ns == ns, REP.c.device_id == dev)).mappings().first()
    running = (hb or {}).get("firmware") or firmware
    if rep and rep["status"] == "installed":
        running = rep["version"]
    elif rep and rep["status"] == "rolled_back" and rep["running"]:
        running = rep["running"]
    view = {"device_id": dev, "group": group, "running": running,
            "assigned": assigned[0] if assigned else None,
            "report": {k: rep[k] for k in ("version", "status", "reason", "running", "ts")} if rep else None}
    # not offered: nothing assigned, already running it, or the device rolled it back since it was assigned
    # (offering it again would loop install → rollback for ever; re-assign to retry)
    pending = bool(assigned) and assigned[0] != running and not (
        rep and rep["version"] == assigned[0] and rep["status"] != "installed" and rep["ts"] >= assigned[1])
    view["pending"] = assigned[0] if pending else None
    return view


@router.get("/api/v1/namespaces/{ns}/ota/status", responses=_ERR)
async def status(ns: str, request: Request, p: Caller, cp: CP,
                 device: str | None = Query(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")) -> dict:
    """Per device: assigned release, running version, pending offer, last report."""
    require_ns(p, ns, request)
    require_role(p, "viewer")

    def q(conn):
        ids = [device] if device else [r[0] for r in conn.execute(
            sa.select(D.c.device_id).where(D.c.ns == ns).order_by(D.c.device_id))]
        return [v for v in (_device_view(conn, ns, d) for d in ids) if v is not None]
    devices = await cp.read(q)
    if device and not devices:
        raise ApiError(404, "unknown device")
    return {"devices": devices}


# ---------------------------------------------------------------- device side
async def pending_for(cp: "ControlPlane", ns: str, dev: str) -> str | None:
    """The release version offered to the device, or None."""
    view = await cp.read(_device_view, ns, dev)
    return view["pending"] if view else None


@router.get("/api/v1/devices/{device_id}/ota", status_code=200, responses={**_ERR, 204: {"description": "none"}})
async def offer(device_id: str, request: Request, p: Caller, cp: CP) -> Response:
    """The release the device should install: `204` when none, else `{version, manifest_url, files_url}`."""
    ns = device_ns(p, device_id, "viewer")
    view = await cp.read(_device_view, ns, device_id)
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
    row = await cp.read(lambda conn: conn.execute(
        sa.select(R.c.manifest, R.c.signature).where(R.c.ns == ns, R.c.version == version)).first())
    if row is None:
        raise ApiError(404, "unknown release")
    if p.is_device:
        from .rollouts import note_download  # a rollout follows its devices' progress (rollouts.py)
        await cp.write(note_download, ns, device_id, version)
    if raw:
        return Response(row[0].encode(), media_type="application/json", headers={"X-Manifest-Signature": row[1]})
    return {"version": version, "manifest": row[0], "signature": row[1]}


@router.get("/api/v1/devices/{device_id}/ota/files/{sha256}", responses=_ERR)
async def file_chunk(device_id: str, sha256: str, p: Caller, cp: CP,
                     offset: int = Query(0, ge=0), length: int = Query(MAX_CHUNK, ge=1, le=MAX_CHUNK)) -> Response:
    """Bytes [offset, offset+length) of a release file (a device downloads in small requests)."""
    ns = device_ns(p, device_id, "viewer")
    row = await cp.read(lambda conn: conn.execute(
        sa.select(F.c.data).where(F.c.ns == ns, F.c.sha256 == sha256)).first())
    if row is None:
        raise ApiError(404, "unknown file")
    data = bytes(row[0])
    if offset > len(data):
        raise ApiError(416, "offset beyond the end of the file", {"size": len(data)})
    return Response(data[offset:offset + length], media_type="application/octet-stream",
                    headers={"X-File-Size": str(len(data))})


@router.post("/api/v1/devices/{device_id}/ota/report", responses=_ERR)
async def report(device_id: str, body: ReportIn, p: Caller, cp: CP) -> dict:
    """The device's install result: installed, rolled_back (with the version it runs again) or failed."""
    ns = own_device_ns(p, device_id, "report OTA results")

    def put(conn, events):
        if conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.device_id == device_id)).first() is None:
            raise NotFound("unknown device")
        conn.execute(REP.delete().where(REP.c.ns == ns, REP.c.device_id == device_id))
        conn.execute(REP.insert().values(ns=ns, device_id=device_id, version=body.version, status=body.status,
                                         reason=body.reason, running=body.running, ts=now_ms()))
    await cp.write(put)
    return {"ok": True}


# ---------------------------------------------------------------- heartbeat hook
#: seconds a process trusts "this namespace has no OTA assignment" (another process's new assignment shows up in
#: heartbeat answers within this; the device's own periodic OTA check does not depend on it)
NO_ASSIGNMENT_TTL_S = 5.0
_no_assignments: dict[tuple[int, str], float] = {}
#: the one query in flight per (app, namespace), and a counter that an assignment bumps (a query that started before
#: it must not store its stale "none")
_refreshing: dict[tuple[int, str], asyncio.Future] = {}
_generation: dict[tuple[int, str], int] = {}


def _has_assignments(conn, ns: str) -> bool:
    return conn.execute(sa.select(AS.c.version).where(AS.c.ns == ns).limit(1)).first() is not None


def assignments_changed(cp: "ControlPlane", ns: str) -> None:
    key = (id(cp), ns)
    _no_assignments.pop(key, None)
    _generation[key] = _generation.get(key, 0) + 1


async def _refresh(cp: "ControlPlane", ns: str, key: tuple[int, str]) -> bool:
    gen = _generation.get(key, 0)
    try:
        has = await cp.read(_has_assignments, ns)
    finally:
        _refreshing.pop(key, None)
    if not has and _generation.get(key, 0) == gen:
        _no_assignments[key] = time.monotonic() + NO_ASSIGNMENT_TTL_S
    return has


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # a failed background refresh: the next heartbeat tries again


async def heartbeat_pending(cp: "ControlPlane", ns: str, dev: str) -> str | None:
    """`pending.ota` of a heartbeat answer: the offered version or None.

    The hot path (no assignment anywhere in the namespace) costs one dict lookup. When that knowledge expires, one
    query refreshes it in the background while heartbeats go on answering from it (at 2,000 heartbeats/s each one
    used to send its own query in that moment, and on SQLite, behind a flush holding the write lock, they filled the
    database queue: timeouts). Only a namespace with assignments, or one not known yet, waits for the query — one
    query, shared by every heartbeat waiting for it."""
    key = (id(cp), ns)
    until = _no_assignments.get(key)
    if until is not None and until > time.monotonic():
        return None
    task = _refreshing.get(key)
    if task is None:
        task = _refreshing[key] = asyncio.ensure_future(_refresh(cp, ns, key))
        task.add_done_callback(_retrieve)
    if until is not None:  # known, if stale: "none" stands until the refresh says otherwise
        return None
    if not await asyncio.shield(task):
        return None
    return await pending_for(cp, ns, dev)
