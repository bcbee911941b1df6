"""ServiceDiscovery's routes: the challenge, the registration and the token refresh (the decisions and the data are
in discovery.py, which hotpath.py also answers from)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .deps import CP, Caller
from .discovery import challenge_answer, device_token, register_answer
from .errors import ApiError
from .models import ChallengeIn, ChallengeOut, ErrorBody, RegisterIn, RegisterOut, TokenOut

CHALLENGE_ROUTE = "/api/devices/challenge"
REGISTER_ROUTE = "/api/devices/register"

_ERR: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 404)}
router = APIRouter(tags=["discovery"])


@router.post(CHALLENGE_ROUTE, response_model=ChallengeOut, responses={**_ERR, 429: {"model": ErrorBody}})
async def challenge(body: ChallengeIn, request: Request, cp: CP) -> ChallengeOut:
    """A single-use nonce bound to this device id, to be signed with the device key. Limited per client address
    (a burst, then a steady rate: `challenges_per_address_*`); beyond, 429 with Retry-After."""
    return challenge_answer(cp, request.client.host if request.client else "", body)


@router.post(REGISTER_ROUTE, response_model=RegisterOut, responses={**_ERR, 422: {"model": ErrorBody}})
async def register(body: RegisterIn, request: Request, cp: CP) -> RegisterOut:
    """Answer the challenge: HMAC-SHA256(device_key, nonce|device_id) → token, service URLs, intervals."""
    return await register_answer(cp, cp.base_url(request), body)


@router.post("/api/devices/refresh", response_model=TokenOut, responses={**_ERR, 403: {"model": ErrorBody}})
async def refresh(p: Caller, cp: CP) -> TokenOut:
    """A fresh device token for a still-valid one (the device is still on record)."""
    if not p.is_device:
        raise ApiError(403, "device token required")
    if await cp.versions_of(p.ns, p.sub) is None:
        raise ApiError(401, "device no longer registered")
    st = cp.settings
    token = device_token(cp, p.sub, p.ns)  # as at registration: no JWT check on the next heartbeat
    return TokenOut(token=token, token_expires_in=st.token_ttl_s)
