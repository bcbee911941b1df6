"""Dashboard sign-in, without HTTP: one-time login tickets (the link the CLI prints) and session tokens.

A ticket is a JWT whose role claim is "login" (so it is never accepted as a bearer token: auth.decode refuses any
role it does not know) carrying the role it signs in as, and a random jti. Redeeming it inserts the jti into
ui_login_tickets: the primary key makes a second use fail on every process sharing the database.
"""
from __future__ import annotations

import secrets
import time

import jwt
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .. import db as tables
from ..auth import ROLES, Principal, decode, issue_token
from ..db import now_ms
from ..errors import ApiError

TICKET_ROLE = "login"


def issue_ticket(signing_key: str, sub: str, ns: str, role: str, ttl_s: int = 900) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    return jwt.encode({"sub": sub, "ns": ns, "role": TICKET_ROLE, "as": role, "jti": secrets.token_hex(16),
                       "iat": now, "exp": now + ttl_s}, signing_key, algorithm="HS256")


def read_ticket(signing_key: str, ticket: str) -> tuple[Principal, str, int]:
    """(principal it signs in as, jti, exp); 401 if forged, expired or not a ticket."""
    try:
        c = jwt.decode(ticket, signing_key, algorithms=["HS256"], options={"require": ["exp", "sub", "jti"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "login link expired") from None
    except jwt.PyJWTError:
        raise ApiError(401, "invalid login link") from None
    if c.get("role") != TICKET_ROLE or c.get("as") not in ROLES or not isinstance(c.get("ns"), str):
        raise ApiError(401, "invalid login link")
    return Principal(sub=c["sub"], ns=c["ns"], role=c["as"], exp=int(c["exp"])), str(c["jti"])[:64], int(c["exp"])


def redeem(conn: sa.Connection, jti: str, exp: int) -> None:
    t = tables.ui_login_tickets
    conn.execute(t.delete().where(t.c.expires_ts < now_ms()))
    try:
        with conn.begin_nested():
            conn.execute(t.insert().values(jti=jti, expires_ts=exp * 1000))
    except IntegrityError:
        raise ApiError(401, "login link already used") from None


def from_token(signing_key: str, token: str) -> Principal:
    p = decode(signing_key, token)
    if p.is_device:
        raise ApiError(403, "device tokens cannot sign in to the dashboard")
    return p


def session_token(signing_key: str, p: Principal, max_s: int) -> tuple[str, int]:
    """A session for p: never longer than `max_s`, nor than the token or ticket it came from."""
    ttl = max(1, min(max_s, p.exp - int(time.time())))
    return issue_token(signing_key, p.sub, p.ns, p.role, ttl), ttl
