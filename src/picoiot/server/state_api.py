"""StateServer's routes: read, update and list a device's shadows, and the blocking read (data: state.py)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request

from .auth import Principal, require_ns, require_role
from .deps import CP, Caller
from .documents import depth
from .errors import ApiError
from .longpoll import wait_for_change
from .models import ConflictBody, ErrorBody, ShadowNames, ShadowOut, ShadowUpdateIn
from .refusals import Forbidden, Malformed, NotFound
from .state import read_shadow, shadow_names, update_shadow

ShadowName = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


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
