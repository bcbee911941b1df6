"""The fleet dashboard at /ui/: one static page (static/: our HTML, JS and CSS) that calls the operators' API with
an HttpOnly session cookie and listens to /api/v1/namespaces/{ns}/events. Every check is the API's (auth.principal
accepts the cookie, with a same-origin check on writes); the page only hides what the role cannot do.

Third-party front-end code (uPlot) is never in the repository: `./dev` installs it from the npm registry into
node_modules/ (package.json), and /ui/vendor/ serves it from there (or from $PICOIOT_UI_VENDOR).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from .. import audit, config
from ..auth import SESSION_COOKIE, Principal, principal, require_ns, require_role, same_origin
from ..db import now_ms
from ..deps import CP, Caller
from ..errors import ApiError
from ..models import ErrorBody
from . import session

STATIC = Path(__file__).with_name("static")
#: what /ui/vendor/ may serve: name → path under the npm package directory
VENDOR = {"uPlot.iife.min.js": ("uplot", "dist/uPlot.iife.min.js"), "uPlot.min.css": ("uplot", "dist/uPlot.min.css")}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
#: the page's own rules: scripts only from this origin, no inline script, nothing framed
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "Cache-Control": "no-cache"}


def vendor_dir() -> Path | None:
    """node_modules/ with the dashboard's npm packages: $PICOIOT_UI_VENDOR, else the checkout's (editable install),
    else the working directory's."""
    env = os.environ.get("PICOIOT_UI_VENDOR")
    candidates = [Path(env)] if env else []
    candidates += [p / "node_modules" for p in Path(__file__).resolve().parents] + [Path.cwd() / "node_modules"]
    for c in candidates:
        if (c / "uplot").is_dir():
            return c
    return None


router = APIRouter(tags=["dashboard"])
_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 403, 404)}


@router.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/", include_in_schema=False)
async def ui_index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/ui/static/{name}", include_in_schema=False)
async def ui_static(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, "not found")
    return FileResponse(path, media_type=_TYPES.get(path.suffix, "application/octet-stream"), headers=_HEADERS)


@router.get("/ui/vendor/{name}", include_in_schema=False)
async def ui_vendor(name: str) -> FileResponse:
    base = vendor_dir()
    if name not in VENDOR:
        raise ApiError(404, "not found")
    if base is None:
        raise ApiError(404, "front-end library not installed: run ./dev setup (npm install)", {"file": name})
    pkg, rel = VENDOR[name]
    return FileResponse(base / pkg / rel, media_type=_TYPES[Path(rel).suffix],
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


def _set_session(request: Request, response: Response, p: Principal) -> dict:
    cp = request.app.state.cp
    token, ttl = session.session_token(cp.settings.secrets.signing_key, p, cp.settings.ui_session_s)
    response.set_cookie(SESSION_COOKIE, token, max_age=ttl, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return {"sub": p.sub, "namespace": p.ns, "role": p.role, "expires_in": ttl}


async def _audit_login(request: Request, p: Principal, how: str, status: int) -> None:
    cp = request.app.state.cp
    ns = p.ns
    await cp.write(lambda conn, _e: audit.append(
        conn, ns=ns, ts=now_ms(), sub=p.sub, role=p.role, via="ui", method="POST", path="/ui/login",
        resource="session", device_id=None, status=status, summary={"request": {"with": how}, "before": None,
                                                                     "after": {"role": p.role}}))


@router.post("/ui/login", responses=_ERR)
async def login(request: Request, cp: CP) -> JSONResponse:
    """Sign in with an operator token ({"token": …}): sets the HttpOnly, SameSite=Strict session cookie."""
    if not same_origin(request):
        raise ApiError(403, "cross-origin request refused", {"origin": request.headers.get("origin")})
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "malformed JSON") from None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token.strip() or len(token) > 4096:
        raise ApiError(422, "invalid request", {"path": "token", "message": "a token is required"})
    p = session.from_token(cp.settings.secrets.signing_key, token.strip())
    response = JSONResponse({})
    response.body = response.render(_set_session(request, response, p))
    response.headers["content-length"] = str(len(response.body))
    await _audit_login(request, p, "token", 200)
    return response


@router.get("/ui/login", include_in_schema=False)
async def login_link(request: Request, cp: CP, ticket: str = Query(..., max_length=4096)) -> Response:
    """The one-time link the CLI prints (`picoiot ui-link`, `picoiot demo`): signs in and goes to the fleet."""
    p, jti, exp = session.read_ticket(cp.settings.secrets.signing_key, ticket)
    await cp.write(lambda conn, _e: session.redeem(conn, jti, exp))
    response = RedirectResponse("/ui/", status_code=303)
    _set_session(request, response, p)
    await _audit_login(request, p, "link", 303)
    return response


@router.post("/ui/logout", include_in_schema=False)
async def logout(request: Request) -> JSONResponse:
    if not same_origin(request):
        raise ApiError(403, "cross-origin request refused")
    response = JSONResponse({"ok": True})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/ui/me", responses=_ERR)
async def me(p: Caller) -> dict:
    """Who the session is: the page shows only what this role can do (the API checks it anyway)."""
    return {"sub": p.sub, "namespace": p.ns, "role": p.role, "expires": p.exp}


@router.get("/api/v1/namespaces/{ns}/devices/{device_id}/config/diff", responses=_ERR)
async def config_diff(ns: str, device_id: str, request: Request, p: Caller, cp: CP) -> dict:
    """The device's current config version and what changed from the previous one ([{path, before, after}])."""
    require_ns(p, ns, request)
    require_role(p, "viewer")
    return await cp.read(config.versions_diff, ns, device_id)
