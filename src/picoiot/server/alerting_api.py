"""Operators' alerting API (docs/control-plane.md, *Alert notifications*): receivers, rules, alerts, notifications."""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, Request
from pydantic import Field

from . import alerting, sealing
from .auth import Principal, require_ns, require_role
from .deps import CP, Caller
from .errors import ApiError
from .models import BaseModel, ErrorBody, Severity

if TYPE_CHECKING:
    from .core import ControlPlane

router = APIRouter(tags=["alerting"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 422)}
Name = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
BASE = "/api/v1/namespaces/{ns}/alerting"


class ReceiverIn(BaseModel):
    kind: Literal["webhook", "alertmanager"]
    url: str = Field(max_length=512, description="webhook: the URL POSTed to; alertmanager: its base URL")
    secret: str | None = Field(None, min_length=16, max_length=128, json_schema_extra={"writeOnly": True},
                               description="webhook HMAC key (required for a webhook, refused for Alertmanager); "
                                           "stored sealed, never returned: answers say only `has_secret`")


class RuleIn(BaseModel):
    event: Literal["alarm", "offline", "rollout_paused", "safe_mode"]
    min_severity: Severity | None = None
    key_pattern: str | None = Field(None, max_length=128, description="alarm key glob (fnmatch), e.g. relay_*")
    offline_for_s: int | None = Field(None, ge=0, le=30 * 86400)
    receivers: list[str] = Field(min_length=1, max_length=16)


def _cp(request: Request) -> "ControlPlane":
    return request.app.state.cp


def _loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def check_url(url: str, request: Request) -> None:
    """http(s) only, and not the control plane itself (a notification about itself would loop)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(422, "url must be an http(s) URL with a host", {"path": "url"})
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ApiError(422, "url has a bad port", {"path": "url"})
    own = [request.base_url]
    if _cp(request).settings.public_url:
        own.append(urlsplit(_cp(request).settings.public_url))
    for o in own:
        o = urlsplit(str(o)) if not hasattr(o, "hostname") else o
        oport = o.port or (443 if o.scheme == "https" else 80)
        same_host = (o.hostname or "").lower() == parts.hostname.lower() or (
            _loopback(parts.hostname) and _loopback(o.hostname or ""))
        if same_host and oport == port:
            raise ApiError(422, "url points at the control plane itself", {"path": "url"})


def _guard(p: Principal, ns: str, request: Request, role: str) -> None:
    require_ns(p, ns, request)
    require_role(p, role)


@router.put(BASE + "/receivers/{name}", responses=_ERR)
async def put_receiver(ns: str, body: ReceiverIn, request: Request, p: Caller, cp: CP, name: str = Name) -> dict:
    """Create or replace a receiver. Admin. A webhook's secret is write-only: kept sealed, never returned."""
    _guard(p, ns, request, "admin")
    check_url(body.url, request)
    # the operator chooses the key and keeps it on the receiver's side; no answer ever carries one back
    if body.kind == "webhook" and body.secret is None:
        raise ApiError(422, "a webhook needs a secret (16-128 characters, e.g. `openssl rand -hex 32`)",
                       {"path": "secret"})
    if body.kind == "alertmanager" and body.secret is not None:
        raise ApiError(422, "Alertmanager receivers are not signed: no secret", {"path": "secret"})
    sealed = sealing.for_key(cp.settings.secrets.signing_key).seal(body.secret) if body.secret else None
    await cp.write(alerting.put_receiver, ns, name, body.kind, body.url, sealed)
    return {"name": name, "kind": body.kind, "url": body.url, "has_secret": sealed is not None}


@router.get(BASE + "/receivers", responses=_ERR)
async def list_receivers(ns: str, request: Request, p: Caller, cp: CP) -> dict:
    """Receivers with their last delivery outcome (secrets are never shown)."""
    _guard(p, ns, request, "viewer")
    return {"receivers": await cp.read(alerting.list_receivers, ns)}


@router.delete(BASE + "/receivers/{name}", responses=_ERR)
async def delete_receiver(ns: str, request: Request, p: Caller, cp: CP, name: str = Name) -> dict:
    _guard(p, ns, request, "admin")
    await cp.write(alerting.delete_receiver, ns, name)
    return {"ok": True}


@router.put(BASE + "/rules/{name}", responses=_ERR)
async def put_rule(ns: str, body: RuleIn, request: Request, p: Caller, cp: CP, name: str = Name) -> dict:
    """Create or replace a rule: which events (alarm severity/key, offline for N s, rollout paused, safe mode)
    notify which receivers. Admin."""
    _guard(p, ns, request, "admin")
    if body.event == "offline" and body.offline_for_s is None:
        raise ApiError(422, "an offline rule needs offline_for_s", {"path": "offline_for_s"})
    return await cp.write(alerting.put_rule, ns, name, body.model_dump())


@router.get(BASE + "/rules", responses=_ERR)
async def list_rules(ns: str, request: Request, p: Caller, cp: CP) -> dict:
    _guard(p, ns, request, "viewer")
    return {"rules": await cp.read(alerting.list_rules, ns)}


@router.delete(BASE + "/rules/{name}", responses=_ERR)
async def delete_rule(ns: str, request: Request, p: Caller, cp: CP, name: str = Name) -> dict:
    _guard(p, ns, request, "admin")
    await cp.write(alerting.delete_rule, ns, name)
    return {"ok": True}


@router.get(BASE + "/alerts", responses=_ERR)
async def list_alerts(ns: str, request: Request, p: Caller, cp: CP,
                      state: str | None = Query(None, pattern="^(firing|resolved)$"),
                      limit: int = Query(200, ge=1, le=1000)) -> dict:
    _guard(p, ns, request, "viewer")
    return {"alerts": await cp.read(alerting.list_alerts, ns, state, limit)}


@router.get(BASE + "/notifications", responses=_ERR)
async def list_notifications(ns: str, request: Request, p: Caller, cp: CP,
                             receiver: str | None = Query(None, max_length=64),
                             limit: int = Query(100, ge=1, le=1000)) -> dict:
    """Queued and sent notifications, newest first: state (open/pending/delivered/gave_up), attempts, last error."""
    _guard(p, ns, request, "viewer")
    return {"notifications": await cp.read(alerting.list_notifications, ns, receiver, limit)}
