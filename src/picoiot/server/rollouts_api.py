"""Operators' rollout API (docs/ota.md, *Rollouts*): a thin layer over rollouts.py."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field, model_validator

from . import rollouts
from .auth import Principal, require_ns, require_role
from .deps import CP, Caller
from .models import INT32, BaseModel, ErrorBody
from .ota import VERSION, assignments_changed

router = APIRouter(tags=["rollouts"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 422)}
NAME = r"^[A-Za-z0-9_.-]{1,64}$"
BASE = "/api/v1/namespaces/{ns}/ota/rollouts"


class TargetIn(BaseModel):
    namespace: bool | None = Field(None, description="every device of the namespace")
    group: str | None = Field(None, pattern=NAME)
    devices: list[str] | None = Field(None, max_length=10_000)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("namespace", "group", "devices") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of namespace, group, devices")
        if self.devices is not None:
            if not self.devices:
                raise ValueError("devices is empty")
            for d in self.devices:
                if not isinstance(d, str) or not 0 < len(d) <= 64:
                    raise ValueError("bad device id")
        return self


class StageIn(BaseModel):
    percent: float | None = Field(None, gt=0, le=100, description="cumulative share of the target, %")
    devices: int | None = Field(None, ge=1, le=INT32, description="cumulative device count (a first canary stage)")
    soak_s: float = Field(0, ge=0, le=30 * 86400, description="how long each device must stay healthy on trial")


class RolloutIn(BaseModel):
    version: str = Field(pattern=VERSION)
    target: TargetIn
    stages: list[StageIn] = Field(min_length=1, max_length=20)
    failure_threshold: float = Field(0.2, ge=0, le=1, description="pause when a stage's failed share exceeds it")
    allow_downgrade: bool = False


class ReasonIn(BaseModel):
    reason: str = Field("", max_length=256)


class ResumeIn(BaseModel):
    version: str | None = Field(None, pattern=VERSION, description="a fixed release to continue with")



def _guard(p: Principal, ns: str, request: Request, role: str) -> None:
    require_ns(p, ns, request)
    require_role(p, role)


@router.post(BASE, status_code=201, responses=_ERR)
async def create(ns: str, body: RolloutIn, request: Request, p: Caller, cp: CP) -> dict:
    """Start a staged rollout of a release to a namespace, a group or a list of devices. Admin."""
    _guard(p, ns, request, "admin")
    spec = body.model_dump()
    spec["target"] = {k: v for k, v in spec["target"].items() if v not in (None, False)}
    spec["stages"] = [{k: v for k, v in s.items() if v is not None} for s in spec["stages"]]
    out = await cp.write(rollouts.create, ns, spec, p.sub)
    assignments_changed(cp, ns)
    return out


@router.get(BASE, responses=_ERR)
async def list_(ns: str, request: Request, p: Caller, cp: CP,
                state: str | None = Query(None, pattern="^(running|paused|aborted|completed)$")) -> dict:
    _guard(p, ns, request, "viewer")
    return {"rollouts": await cp.read(rollouts.list_rollouts, ns, state)}


@router.get(BASE + "/{rid}", responses=_ERR)
async def get(ns: str, request: Request, p: Caller, cp: CP, rid: int = Path(ge=1, le=INT32)) -> dict:
    """The rollout, its stages (device counts per status) and every device's status and reason."""
    _guard(p, ns, request, "viewer")
    return await cp.read(rollouts.detail, ns, rid)


@router.post(BASE + "/{rid}/pause", responses=_ERR)
async def pause(ns: str, request: Request, p: Caller, cp: CP, body: ReasonIn | None = None,
                rid: int = Path(ge=1, le=INT32)) -> dict:
    _guard(p, ns, request, "admin")
    reason = (body.reason if body else "") or f"paused by {p.sub}"
    out = await cp.write(rollouts.pause, ns, rid, reason)
    assignments_changed(cp, ns)
    return out


@router.post(BASE + "/{rid}/resume", responses=_ERR)
async def resume(ns: str, request: Request, p: Caller, cp: CP, body: ResumeIn | None = None,
                 rid: int = Path(ge=1, le=INT32)) -> dict:
    _guard(p, ns, request, "admin")
    out = await cp.write(rollouts.resume, ns, rid, body.version if body else None)
    assignments_changed(cp, ns)
    return out


@router.post(BASE + "/{rid}/abort", responses=_ERR)
async def abort(ns: str, request: Request, p: Caller, cp: CP, body: ReasonIn | None = None,
                rid: int = Path(ge=1, le=INT32)) -> dict:
    _guard(p, ns, request, "admin")
    reason = (body.reason if body else "") or f"aborted by {p.sub}"
    out = await cp.write(rollouts.abort, ns, rid, reason)
    assignments_changed(cp, ns)
    return out
