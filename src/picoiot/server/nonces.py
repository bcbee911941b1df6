"""Stateless registration nonces: the challenge writes nothing; single use is enforced when the nonce is answered.

A nonce is 64 lowercase hex characters, made and checked with a key derived from the signing key (so every replica
sharing the secrets can check what any of them issued):

    expiry (8: unix seconds) | random (16) | id tag (8) | MAC (32)

- id tag = HMAC(key, "ns|device_id")[:4 bytes]: binds the nonce to the device and namespace it was issued for, and
  names the namespace when the register request does not (the firmware never sends it).
- MAC = HMAC(key, the 32 characters before it)[:16 bytes]: only this server's secrets can make a nonce that passes
  `expiry_of`, so a forged or altered one is refused without touching the database.

Single use: the first answer naming a genuine, unexpired nonce records it in the `nonces` table (its primary key),
in the registration's own transaction, or in a transaction of its own when the answer is refused. A second answer,
on any replica, finds the row and is refused. Rows are swept once expired (liveness.py), when the expiry alone
refuses the nonce.

Why: the challenge was a transaction of its own (a nonce row written, then deleted by the answer): a quarter of a
registration's round trips to the database, in a storm of 20,000 re-registrations after a restart
(docs/control-plane.md, *How far it scales*).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from functools import lru_cache
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from . import db as tables

LENGTH = 64
_HEX = frozenset("0123456789abcdef")
N = tables.nonces


@lru_cache(maxsize=8)
def _key(signing_key: str) -> bytes:
    return hmac.new(signing_key.encode(), b"picoiot registration nonce v1", hashlib.sha256).digest()


def _id_tag(key: bytes, ns: str, dev: str) -> str:
    return hmac.new(key, f"{ns}|{dev}".encode(), hashlib.sha256).hexdigest()[:8]


def _mac(key: bytes, head: str) -> str:
    return hmac.new(key, head.encode(), hashlib.sha256).hexdigest()[:32]


def issue(signing_key: str, ns: str, dev: str, ttl_s: int, now_s: float | None = None) -> str:
    """A nonce for `dev` in `ns`, good for at least `ttl_s` seconds (`now_s`: the issuing time, for tests)."""
    key = _key(signing_key)
    expiry = math.ceil(time.time() if now_s is None else now_s) + ttl_s
    head = f"{expiry:08x}{secrets.token_hex(8)}{_id_tag(key, ns, dev)}"
    return head + _mac(key, head)


def expiry_of(signing_key: str, nonce: str) -> int | None:
    """The nonce's expiry (ms) if this server's secrets made it, whatever its age; None for anything else."""
    if len(nonce) != LENGTH or not _HEX.issuperset(nonce):
        return None
    if not hmac.compare_digest(_mac(_key(signing_key), nonce[:32]), nonce[32:]):
        return None
    return int(nonce[:8], 16) * 1000


def namespace_of(signing_key: str, nonce: str, dev: str, candidates: Iterable[str]) -> str | None:
    """The namespace among `candidates` that the (genuine) nonce was issued to `dev` in; None if none."""
    key = _key(signing_key)
    tag = nonce[24:32]
    for ns in candidates:
        if hmac.compare_digest(_id_tag(key, ns, dev), tag):
            return ns
    return None


def _use_statement(dialect) -> sa.Insert:
    ins = postgresql.insert(N) if dialect == "postgresql" else sqlite.insert(N)
    return (ins.values(nonce=sa.bindparam("nonce"), ns=sa.bindparam("ns"), device_id=sa.bindparam("dev"),
                       expires_ts=sa.bindparam("expires_ts"))
            .on_conflict_do_nothing(index_elements=[N.c.nonce]).returning(N.c.nonce))


#: built once per dialect (a statement built per call costs as much CPU as its round trip)
_USE = {d: _use_statement(d) for d in ("postgresql", "sqlite")}


def use(conn: sa.Connection, nonce: str, ns: str, dev: str, expires_ts: int) -> bool:
    """Record the nonce as answered; False if it already was (a replay, here or on another replica). Concurrent
    answers wait on each other's uncommitted row: exactly one of them records it."""
    params = {"nonce": nonce, "ns": ns, "dev": dev, "expires_ts": expires_ts}
    return conn.execute(_USE[conn.dialect.name], params).first() is not None
