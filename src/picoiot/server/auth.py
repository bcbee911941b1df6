"""Keys and tokens: derived device keys, registration HMACs, device and operator JWTs, role checks."""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

import jwt
from fastapi import Request

from .errors import ApiError

ROLES = {"viewer": 1, "operator": 2, "admin": 3}
DEVICE_ROLE = "device"
ALL_NAMESPACES = "*"


def derive_device_key(enrollment_key: str, device_id: str) -> str:
    return hmac.new(enrollment_key.encode(), device_id.encode(), hashlib.sha256).hexdigest()


def registration_signature(device_key: str, nonce: str, device_id: str) -> str:
    return hmac.new(device_key.encode(), f"{nonce}|{device_id}".encode(), hashlib.sha256).hexdigest()


def signature_ok(device_key: str, nonce: str, device_id: str, signature: str) -> bool:
    expected = registration_signature(device_key, nonce, device_id)
    return hmac.compare_digest(expected.encode(), signature.lower().encode())


def issue_token(signing_key: str, sub: str, ns: str, role: str, ttl_s: int, now: int | None = None) -> str:
    now = int(time.time()) if now is None else now
    return jwt.encode({"sub": sub, "ns": ns, "role": role, "iat": now, "exp": now + int(ttl_s)},
                      signing_key, algorithm="HS256")


def device_local_token(device_key: str, device_id: str, role: str, ttl_s: int, sub: str = "operator") -> str:
    """A token for a device's own REST/WebSocket API, signed with that device's key (no fleet secret on devices)."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "aud": device_id, "iat": now, "exp": now + int(ttl_s)},
                      device_key, algorithm="HS256")


@dataclass(frozen=True)
class Principal:
    sub: str
    ns: str
    role: str
    exp: int

    @property
    def is_device(self) -> bool:
        return self.role == DEVICE_ROLE

    def at_least(self, role: str) -> bool:
        return ROLES.get(self.role, 0) >= ROLES[role]

    def sees(self, ns: str) -> bool:
        return self.ns == ns or (self.ns == ALL_NAMESPACES and not self.is_device)


def decode(signing_key: str, token: str) -> Principal:
    try:
        claims = jwt.decode(token, signing_key, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "token expired", headers={"WWW-Authenticate": "Bearer"}) from None
    except jwt.PyJWTError:
        raise ApiError(401, "invalid token", headers={"WWW-Authenticate": "Bearer"}) from None
    role, ns, sub = claims.get("role"), claims.get("ns"), claims.get("sub")
    if role not in ROLES and role != DEVICE_ROLE or not isinstance(ns, str) or not isinstance(sub, str):
        raise ApiError(401, "invalid token claims", headers={"WWW-Authenticate": "Bearer"})
    return Principal(sub=sub, ns=ns, role=role, exp=int(claims["exp"]))


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer(request: Request) -> str:
    token = bearer_token(request.headers.get("authorization", ""))
    if token is None:
        raise ApiError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token


class TokenCache:
    """Verified tokens → Principal. A device presents the same token on every heartbeat for an hour; checking the
    signature once and `exp` every time takes JWT verification off the hot path. Bounded: cleared when full."""

    #: entries kept before the cache is emptied (≈ 20,000 devices + operators, a few MB)
    max_entries = 50_000

    def __init__(self) -> None:
        self._seen: dict[str, Principal] = {}
        #: signatures checked (cache misses), for /metrics
        self.verifications = 0

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, token: str) -> Principal | None:
        """The cached, unexpired principal of `token`, or None (then call `principal`); changes nothing."""
        p = self._seen.get(token)
        return p if p is not None and p.exp > time.time() else None

    def issued(self, token: str, p: Principal) -> None:
        """A token this server has just signed, with its claims: its first use skips the signature check (a device
        heartbeats right after registering), without decoding what was just encoded."""
        if len(self._seen) >= self.max_entries:
            self._seen.clear()
        self._seen[token] = p

    def principal(self, signing_key: str, token: str) -> Principal:
        p = self._seen.get(token)
        if p is None:
            self.verifications += 1
            p = decode(signing_key, token)
            self.issued(token, p)
        elif p.exp <= time.time():
            self._seen.pop(token, None)
            raise ApiError(401, "token expired", headers={"WWW-Authenticate": "Bearer"})
        return p


SESSION_COOKIE = "picoiot_session"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def same_origin(request: Request) -> bool:
    """A cookie-authenticated write must come from the dashboard's own origin (CSRF). SameSite=Strict already keeps
    the cookie off other sites' requests; this is the second lock: `Origin` (or, failing it, `Referer`) must name
    this server, and a browser's `Sec-Fetch-Site: cross-site` is refused outright."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if not referer:
            return False
        scheme, _, rest = referer.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0]}"
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    public = request.app.state.cp.settings.public_url
    if public:
        scheme, _, rest = public.partition("://")
        own.add(f"{scheme}://{rest.split('/', 1)[0]}")
    return origin in own


def session_principal(request: Request, token: str) -> Principal:
    """The dashboard's session cookie (server/ui): a token like an operator's, minted at sign-in."""
    cp = request.app.state.cp
    if request.method not in _SAFE_METHODS and not same_origin(request):
        raise ApiError(403, "cross-origin request refused", {"origin": request.headers.get("origin")})
    p = cp.tokens.principal(cp.settings.secrets.signing_key, token)
    if p.is_device:
        raise ApiError(401, "invalid session")
    return p


async def principal(request: Request) -> Principal:
    """FastAPI dependency (async: a sync one would cost a thread hop per request): the caller, from its token —
    the `Authorization: Bearer` header, or else the dashboard's session cookie."""
    cp = request.app.state.cp
    if "authorization" not in request.headers:
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            return session_principal(request, session)
    return cp.tokens.principal(cp.settings.secrets.signing_key, bearer(request))


def require_role(p: Principal, role: str) -> None:
    if p.is_device or not p.at_least(role):
        raise ApiError(403, f"role {role} required", {"role": p.role})


def require_ns(p: Principal, ns: str, request: Request) -> None:
    """Another namespace looks exactly like a missing one (no existence leak)."""
    if not p.sees(ns) or request.app.state.cp.settings.secrets.enrollment_key(ns) is None:
        raise ApiError(404, "unknown namespace")


def require_device_or_role(p: Principal, device_id: str, role: str) -> None:
    if p.is_device:
        if p.sub != device_id:
            raise ApiError(404, "not found")
        return
    require_role(p, role)


def device_ns(p: Principal, device_id: str, role: str) -> str:
    """Namespace for the device-facing endpoints (no namespace in the path): the device's own, or the operator's."""
    require_device_or_role(p, device_id, role)
    if p.ns == ALL_NAMESPACES:
        raise ApiError(403, "this endpoint needs a token of one namespace; use /api/v1/namespaces/{ns}/…")
    return p.ns


def own_device_ns(p: Principal, device_id: str, action: str) -> str:
    """Namespace for what only a device does about itself (heartbeats, reports, telemetry, alarms): another device's
    path is 404, an operator 403 (`only devices {action}`), a device token of every namespace 403. The FastAPI routes
    and the heartbeat fast path (hotpath.py) all decide with this."""
    if not p.is_device:
        raise ApiError(403, f"only devices {action}")
    return device_ns(p, device_id, "admin")
