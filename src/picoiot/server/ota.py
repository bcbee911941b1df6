"""OTA's data (docs/ota.md): signed releases, assignment to devices/groups, the device's offer, manifest, files,
reports, and the heartbeat's offer. Knows no HTTP (the routes are in ota_api.py).

The server never signs: the publisher signs the manifest offline with Ed25519; the server checks the signature against
the namespace's public key before it stores a release (so a bad upload is refused early), and the device checks it
again with the key in its own flash (the server is not trusted with code).
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import sqlalchemy as sa
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pydantic import BaseModel, Field

from . import changes
from .changes import Events
from . import db as tables
from .db import now_ms
from .plane import Plane
from .refusals import Conflict, Invalid, NotFound

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
def put_key(conn: sa.Connection, events: Events, ns: str, public_key: str) -> None:
    conn.execute(K.delete().where(K.c.ns == ns))
    conn.execute(K.insert().values(ns=ns, public_key=public_key, updated_ts=now_ms()))


def put_file(conn: sa.Connection, events: Events, ns: str, sha256: str, data: bytes) -> None:
    """Store a release file under its sha256 (checked by the caller); the same file again is a no-op."""
    if conn.execute(sa.select(F.c.size).where(F.c.ns == ns, F.c.sha256 == sha256)).first() is None:
        conn.execute(F.insert().values(ns=ns, sha256=sha256, size=len(data), data=data))


def publish(conn: sa.Connection, events: Events, ns: str, body: ReleaseIn, m: dict) -> bool:
    """Store a release whose manifest `m` (check_manifest) is signed with the namespace's key and whose files are
    uploaded; False if the same release is already stored (a retry)."""
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


def releases(conn: sa.Connection, ns: str) -> list[dict[str, Any]]:
    return [{"version": r[0], "created_ts": r[1]} for r in
            conn.execute(sa.select(R.c.version, R.c.created_ts).where(R.c.ns == ns).order_by(R.c.created_ts))]


def assignment_changed(conn: sa.Connection, events: Events, ns: str, kind: str, target: str) -> None:
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


def assign(conn: sa.Connection, events: Events, ns: str, body: AssignIn) -> None:
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
    assignment_changed(conn, events, ns, kind, target)


def device_view(conn: sa.Connection, ns: str, dev: str) -> dict | None:
    """Assigned release, running version, pending offer and last report of one device; None if it does not exist."""
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


def status(conn: sa.Connection, ns: str, device: str | None) -> list[dict]:
    """device_view of one device, or of every device of the namespace."""
    ids = [device] if device else [r[0] for r in conn.execute(
        sa.select(D.c.device_id).where(D.c.ns == ns).order_by(D.c.device_id))]
    return [v for v in (device_view(conn, ns, d) for d in ids) if v is not None]


# ---------------------------------------------------------------- device side
async def pending_for(cp: Plane, ns: str, dev: str) -> str | None:
    """The release version offered to the device, or None."""
    view = await cp.read(device_view, ns, dev)
    return view["pending"] if view else None


def release(conn: sa.Connection, ns: str, version: str):
    """(manifest text, signature) of a release, or None."""
    return conn.execute(sa.select(R.c.manifest, R.c.signature).where(R.c.ns == ns, R.c.version == version)).first()


def file_data(conn: sa.Connection, ns: str, sha256: str) -> bytes | None:
    row = conn.execute(sa.select(F.c.data).where(F.c.ns == ns, F.c.sha256 == sha256)).first()
    return None if row is None else bytes(row[0])


def save_report(conn: sa.Connection, events: Events, ns: str, dev: str, body: ReportIn) -> None:
    """The device's install result replaces its previous one."""
    if conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.device_id == dev)).first() is None:
        raise NotFound("unknown device")
    conn.execute(REP.delete().where(REP.c.ns == ns, REP.c.device_id == dev))
    conn.execute(REP.insert().values(ns=ns, device_id=dev, version=body.version, status=body.status,
                                     reason=body.reason, running=body.running, ts=now_ms()))


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


def assignments_changed(cp: Plane, ns: str) -> None:
    key = (id(cp), ns)
    _no_assignments.pop(key, None)
    _generation[key] = _generation.get(key, 0) + 1


async def _refresh(cp: Plane, ns: str, key: tuple[int, str]) -> bool:
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


async def heartbeat_pending(cp: Plane, ns: str, dev: str) -> str | None:
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
