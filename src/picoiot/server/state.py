"""StateServer: named shadows per (namespace, device) with AWS IoT shadow semantics."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request

from . import changes
from .changes import Events
from . import db as tables
from .auth import Principal, require_ns, require_role
from .config import latest
from .db import now_ms
from .deps import CP, Caller
from .documents import check_limits, delta, depth, merge, stamp
from .errors import ApiError
from .longpoll import wait_for_change
from .models import ConflictBody, ErrorBody, ShadowNames, ShadowOut, ShadowUpdateIn
from .refusals import Conflict, Forbidden, Invalid, Malformed, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

S, D = tables.shadows, tables.devices
ShadowName = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


def render(row, ns: str | None = None) -> dict[str, Any]:
    if row is None:
        desired, reported, meta, version, ts = {}, {}, {}, 0, 0
    else:
        desired, reported, meta, version, ts = (row["desired"], row["reported"], row["meta"], row["version"],
                                                row["updated_ts"])
    return {"state": {"desired": desired, "reported": reported, "delta": delta(desired, reported)},
            "metadata": {"desired": meta.get("desired", {}), "reported": meta.get("reported", {})},
            "version": version, "timestamp": ts}


def _device_exists(conn, ns, dev) -> bool:
    return conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.device_id == dev)).first() is not None


def read_shadow(conn: sa.Connection, ns: str, dev: str, name: str) -> dict[str, Any]:
    """A shadow nobody wrote yet reads as empty at version 0 (the device's first GET after provisioning)."""
    row = conn.execute(sa.select(S).where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name)).mappings().first()
    if row is None and not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    return render(row)


#: what a relay accepts as its desired value (firmware/relays_controller.py, on_delta, accepts the same)
RELAY_VALUES = ("on", "off", True, False)


def check_desired(conn: sa.Connection, ns: str, dev: str, desired: dict[str, Any]) -> None:
    """A desired value the device could not apply is refused here, before it is stored and pushed: for a device whose
    config has `relays`, every key set (not cleared) must be one of those relays and its value "on"/"off"/true/false.

    A device with no type or config yet is not checked (nothing to check against); its firmware refuses what it cannot
    apply and reports it under `reported.rejected`."""
    cur = latest(conn, ns, dev)
    relays = cur[1].get("relays") if cur else None
    if not isinstance(relays, dict):
        return
    errors = []
    for key, v in desired.items():
        if v is None:
            continue  # clearing is always allowed (a relay removed since, a value the device reported rejected)
        if key not in relays:
            errors.append({"path": f"state.desired.{key}",
                           "message": "unknown relay (this device has: %s)" % (", ".join(sorted(relays)) or "none")})
        elif not any(v is ok if isinstance(ok, bool) else v == ok for ok in RELAY_VALUES):
            errors.append({"path": f"state.desired.{key}", "message": 'must be "on", "off", true or false'})
    if errors:
        first = errors[0]
        raise Invalid(f"{first['path']}: {first['message']}",
                      {"path": first["path"], "message": first["message"], "errors": errors[:16]})


def update_shadow(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev: str, name: str,
                  body: ShadowUpdateIn) -> dict[str, Any]:
    st = cp.settings
    row = conn.execute(sa.select(S).where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name)
                       .with_for_update()).mappings().first()
    if row is None and not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    current = row["version"] if row else 0
    if body.version is not None and body.version != current:
        raise Conflict("version conflict", version=current)
    if body.state.desired and name == "default":  # the shadow the firmware acts on (protocol §4)
        check_desired(conn, ns, dev, body.state.desired)
    desired = dict(row["desired"]) if row else {}
    reported = dict(row["reported"]) if row else {}
    meta = dict(row["meta"]) if row else {}
    ts = now_ms()
    if body.state.desired is not None:
        desired = merge(desired, body.state.desired)
        meta["desired"] = stamp(meta.get("desired", {}), body.state.desired, ts)
    if body.state.reported is not None:
        reported = merge(reported, body.state.reported)
        meta["reported"] = stamp(meta.get("reported", {}), body.state.reported, ts)
    for section, doc in (("desired", desired), ("reported", reported)):
        check_limits(doc, st.max_doc_bytes, st.max_doc_depth, f"state.{section}")
    check_limits({"desired": desired, "reported": reported}, st.max_doc_bytes, st.max_doc_depth + 1, "state")
    version = current + 1
    values = {"desired": desired, "reported": reported, "meta": meta, "version": version, "updated_ts": ts}
    if row is None:
        conn.execute(S.insert().values(ns=ns, device_id=dev, name=name, **values))
    else:
        n = conn.execute(S.update().where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name,
                                          S.c.version == current).values(**values)).rowcount
        if n != 1:  # only without row locks (never on PostgreSQL/SQLite as configured), but never lose an update
            raise Conflict("version conflict", version=current + 1)
    events.emit(conn, changes.state(ns, dev, name, version))
    return render(values)


def shadow_names(conn: sa.Connection, ns: str, dev: str) -> list[str]:
    if not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    return [r[0] for r in conn.execute(sa.select(S.c.name).where(S.c.ns == ns, S.c.device_id == dev)
                                       .order_by(S.c.name))]


def _only_nulls(d: Any) -> bool:
    if isinstance(d, dict):
        return all(v is None or _only_nulls(v) for v in d.values()) and bool(d)
    return False


def check_writer(p: Principal, dev: str, body: ShadowUpdateIn) -> None:
    """Devices write `reported` (and may clear `desired` fields with null); operators write `desired`."""
    s = body.state
    if s.desired is None and s.reported is None:
        raise Malformed("nothing to update: give state.desired or state.reported")
    if p.is_device:
        if p.sub != dev:
            raise NotFound("unknown device")
        if s.desired is not None and not _only_nulls(s.desired):
            raise Forbidden("devices write state.reported (and may only clear state.desired fields)")
        return
    require_role(p, "operator")
    if s.reported is not None and not p.at_least("admin"):
        raise Forbidden("operators write state.desired; state.reported is the device's")


_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413)}
router = APIRouter(tags=["state"])
_PATH = "/api/v1/namespaces/{ns}/devices/{device_id}/shadows"


def _access(request: Request, p: Principal, ns: str, dev: str) -> None:
    require_ns(p, ns, request)
    if p.is_device:
        if p.sub != dev:
            raise NotFound("unknown device")
    else:
        require_role(p, "viewer")


@router.get(_PATH + "/{name}", response_model=ShadowOut, responses=_ERR)
async def get_shadow(ns: str, device_id: str, request: Request, p: Caller, cp: CP, name: str = ShadowName,
                     version: int | None = Query(None, ge=0, le=2**31 - 1),
                     wait: float | None = Query(None, ge=0, le=86400)) -> dict[str, Any]:
    """The full shadow document. `?version=N&wait=S` blocks until the version differs from N (or S passes)."""
    _access(request, p, ns, device_id)

    async def fetch():
        return await cp.read(read_shadow, ns, device_id, name)

    if wait and version is not None:
        return await wait_for_change(cp, ns, device_id, min(wait, cp.settings.max_state_wait_s), "state", fetch,
                                     lambda d: d["version"] != version)
    return await fetch()


@router.post(_PATH + "/{name}", response_model=ShadowOut,
             responses={**_ERR, 409: {"model": ConflictBody, "description": "stale version"}})
async def post_shadow(ns: str, device_id: str, body: ShadowUpdateIn, request: Request, p: Caller, cp: CP,
                      name: str = ShadowName) -> dict[str, Any]:
    """Partial update (deep merge, null deletes); with `version`, only if the shadow is still at that version."""
    require_ns(p, ns, request)
    check_writer(p, device_id, body)
    st = cp.settings
    for section in (body.state.desired, body.state.reported):
        if section is not None and depth(section) > st.max_doc_depth:
            raise ApiError(400, "document too deep", {"depth": depth(section), "max_depth": st.max_doc_depth})
    return await cp.write(update_shadow, cp, ns, device_id, name, body)


@router.get(_PATH, response_model=ShadowNames, responses=_ERR)
async def list_shadows(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> ShadowNames:
    """Names of the device's shadows."""
    _access(request, p, ns, device_id)
    return ShadowNames(shadows=await cp.read(shadow_names, ns, device_id))
