"""ServiceDiscovery's decisions and data: challenge → HMAC-signed registration → device JWT, service URLs and
intervals; token issue. Answered by its routes (discovery_api.py) and by the fast path (hotpath.py); no HTTP here."""
from __future__ import annotations

import time
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any, Iterator

import sqlalchemy as sa

from . import changes, nonces
from .changes import Events
from . import db as tables
from .alarms import resolve_server_alarm
from .auth import DEVICE_ROLE, Principal, derive_device_key, issue_token, signature_ok
from .config import effective, store_if_changed, type_row
from .db import now_ms
from .liveness import OFFLINE_KEY
from .models import ChallengeIn, ChallengeOut, RegisterIn, RegisterOut
from .refusals import Invalid, NotFound, Refused, Throttled, Unauthenticated

if TYPE_CHECKING:
    from .core import ControlPlane

D, S = tables.devices, tables.shadows
C, TY, G = tables.device_configs, tables.device_types, tables.groups


def advertised_ntp(ntp_address: str | None, base_url: str) -> str | None:
    """The SNTP `host:port` to hand a device. A server bound to every interface (0.0.0.0 / ::) cannot advertise
    that address — a device would query itself — so the host the device reached us at (or --public-url) is used."""
    if not ntp_address:
        return None
    host, _, port = ntp_address.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = urlsplit(base_url).hostname or "127.0.0.1"  # IPv6 unbracketed: devices split at the last ':'
    return f"{host}:{port}"


def ttl_for(settings, heartbeat_s: int) -> int:
    """Three missed heartbeats plus slack for a slow Wi-Fi reconnect (10 s → 35 s)."""
    return heartbeat_s * settings.ttl_missed + settings.ttl_slack_s


class BadNonce(Unauthenticated):
    def __init__(self) -> None:
        super().__init__("unknown or expired nonce")


def _registration_query() -> sa.Select:
    """The device (locked), its type, its group's overrides, its latest stored config and its default shadow's
    version: five reads in one round trip. Built once, so SQLAlchemy compiles it once per dialect."""
    latest = (sa.select(C.c.version).where(C.c.ns == D.c.ns, C.c.device_id == D.c.device_id)
              .order_by(C.c.version.desc()).limit(1))
    dtype = sa.func.coalesce(sa.bindparam("dtype", type_=sa.String), D.c.device_type)
    return (sa.select(D, TY.c.name.label("t_name"), TY.c.defaults.label("t_defaults"),
                      TY.c.json_schema.label("t_schema"), G.c.overrides.label("g_overrides"),
                      latest.scalar_subquery().label("c_version"),
                      latest.with_only_columns(C.c.config).scalar_subquery().label("c_config"),
                      sa.select(S.c.version).where(S.c.ns == D.c.ns, S.c.device_id == D.c.device_id,
                                                   S.c.name == "default").scalar_subquery().label("s_version"))
            .select_from(D.outerjoin(TY, TY.c.name == dtype)
                         .outerjoin(G, sa.and_(G.c.ns == D.c.ns, G.c.name == D.c.group_name)))
            .where(D.c.ns == sa.bindparam("ns"), D.c.device_id == sa.bindparam("dev"))
            .with_for_update(of=D))


_REGISTRATION = _registration_query()
_DEVICE_COLUMNS = tuple(c.name for c in D.c)


def _register(conn: sa.Connection, events: Events, cp: "ControlPlane", body: RegisterIn, ns: str,
              expires_ts: int) -> tuple[dict, int]:
    """Use the nonce and register, in one transaction: a registration storm after a restart is 20,000 of these, and
    each round trip to the database counts (docs/control-plane.md, *How far it scales*): five for a known device
    (the nonce, one read, the write of its row, the event, the commit). Returns (config, ttl).

    A refusal rolls the nonce's use back with everything else; the caller then records it on its own
    (`nonces.use`), so a nonce is still used up by the first answer that names it, right or wrong."""
    dev = body.device_id
    if not nonces.use(conn, body.nonce, ns, dev, expires_ts):
        raise BadNonce()
    enrollment_key = cp.settings.secrets.enrollment_key(ns)
    m = conn.execute(_REGISTRATION, {"ns": ns, "dev": dev, "dtype": body.device_type}).mappings().first()
    row = {k: m[k] for k in _DEVICE_COLUMNS} if m is not None else None
    if row is not None and row["device_key"]:
        key = row["device_key"]
    elif enrollment_key is not None:
        key = derive_device_key(enrollment_key, dev)
    else:
        raise NotFound("unknown device")
    if not signature_ok(key, body.nonce, dev, body.signature):
        raise Unauthenticated("bad signature")
    dtype = body.device_type or (row["device_type"] if row else None)
    if m is not None:
        t = {"name": m["t_name"], "defaults": m["t_defaults"], "json_schema": m["t_schema"]} if m["t_name"] else None
    else:
        t = type_row(conn, dtype) if dtype is not None else None
    if dtype is not None and t is None:
        raise Invalid(f"unknown device type {dtype!r}", {"path": "device_type"})
    now = now_ms()
    values: dict[str, Any] = {"device_type": dtype, "firmware": body.firmware, "capabilities": body.capabilities,
                              "address": body.address, "reset_cause": body.reset_cause, "registered_ts": now,
                              "last_seen": now, "online": True}
    # the device as it will be once written: its config (and so its TTL) is known before the one write of its row
    fresh = dict(row) if row is not None else {"ns": ns, "device_id": dev, "group_name": None, "config_overrides": {},
                                                "config_version": 0}
    fresh.update(values)
    cfg: dict = {}
    if t is not None:
        cfg, schema = effective(conn, ns, fresh, type_override=t,
                                group_override=(m["g_overrides"] or {}) if m is not None else None)
    hb = int(cfg.get("heartbeat_interval_s") or cp.settings.default_heartbeat_s)
    ttl = ttl_for(cp.settings, hb)
    if t is None:
        cv = fresh["config_version"]
    elif m is not None and m["c_version"] is not None and m["c_config"] == cfg:
        cv = m["c_version"]  # what store_if_changed would find, without reading it again
    else:
        cv = None  # stored (or found unchanged) after the device's row is written
    if row is None:
        conn.execute(D.insert().values(ns=ns, device_id=dev, created_ts=now, first_seen=now, ttl_s=ttl,
                                       config_overrides={}, config_version=0, **values))
    else:
        if row["first_seen"] is None:
            values["first_seen"] = now
        update = D.update().where(D.c.ns == ns, D.c.device_id == dev).values(ttl_s=ttl, **values)
        if cv is not None:  # the usual re-registration: its event rides on the write of its row
            event = changes.registered(ns, dev, ttl, int(cv), int(m["s_version"] or 0))
            notify = cp.notifier.notify_column(event)
            conn.execute(update if notify is None else update.returning(notify))
            events.local(event)
        else:
            conn.execute(update)
        if not row["online"]:
            resolve_server_alarm(conn, ns, dev, OFFLINE_KEY, now)
        if cv is not None:
            return cfg, ttl
    if cv is None:
        cv = store_if_changed(conn, events, cp, ns, fresh, cfg, schema, check_unchanged=False)
    if m is not None:
        sv = m["s_version"]
    else:
        sv = conn.execute(sa.select(S.c.version).where(S.c.ns == ns, S.c.device_id == dev,
                                                       S.c.name == "default")).scalar()
    events.emit(conn, changes.registered(ns, dev, ttl, int(cv), int(sv or 0)))
    return cfg, ttl


def _answered_nonce(cp: "ControlPlane", body: RegisterIn) -> tuple[str, int]:
    """(namespace, expiry ms) of the answered nonce, checked without the database; BadNonce if this server's
    secrets did not make it for this device (and namespace, if the body names one), or it has expired."""
    st = cp.settings.secrets
    expires_ts = nonces.expiry_of(st.signing_key, body.nonce)
    if expires_ts is None or expires_ts < now_ms():
        raise BadNonce()
    named = "namespace" in body.model_fields_set
    ns = nonces.namespace_of(st.signing_key, body.nonce, body.device_id,
                             (body.namespace,) if named else _default_first(st))
    if ns is None:
        raise _Misdirected(expires_ts)
    return ns, expires_ts


def _default_first(st) -> Iterator[str]:
    """The namespaces a nonce may name when the body names none (the firmware never does): "default" first, the
    secrets' list (which checks the secrets file) only if it is not that one."""
    yield "default"
    yield from (ns for ns in st.namespaces() if ns != "default")


class _Misdirected(BadNonce):
    """A genuine nonce answered for another device or namespace: refused, and used up all the same."""

    def __init__(self, expires_ts: int) -> None:
        super().__init__()
        self.expires_ts = expires_ts


def device_token(cp: "ControlPlane", dev: str, ns: str) -> str:
    now, ttl = int(time.time()), cp.settings.token_ttl_s
    token = issue_token(cp.settings.secrets.signing_key, dev, ns, DEVICE_ROLE, ttl, now=now)
    cp.tokens.issued(token, Principal(sub=dev, ns=ns, role=DEVICE_ROLE, exp=now + ttl))
    return token


def challenge_answer(cp: "ControlPlane", host: str, body: ChallengeIn) -> ChallengeOut:
    """The challenge, for the route and for the fast path (hotpath.py): one decision, one answer."""
    wait = cp.challenges.take(host)
    if wait:
        cp.metrics.registrations.labels("throttled").inc()
        raise Throttled("too many registration challenges from this address", {"retry_after_s": round(wait, 1)},
                        retry_after_s=max(1, int(wait + 0.999)))
    if cp.settings.secrets.enrollment_key(body.namespace) is None:
        raise NotFound("unknown namespace")
    nonce = nonces.issue(cp.settings.secrets.signing_key, body.namespace, body.device_id, cp.settings.nonce_ttl_s)
    return ChallengeOut(nonce=nonce, expires_in=cp.settings.nonce_ttl_s)


async def register_answer(cp: "ControlPlane", base: str, body: RegisterIn) -> RegisterOut:
    """The registration, for the route and for the fast path (hotpath.py): one decision, one answer. `base`: the URL
    the device reached us at (or --public-url), for its service URLs."""
    ns, expires_ts = body.namespace, 0
    try:
        ns, expires_ts = _answered_nonce(cp, body)
        cfg, ttl = await cp.write(_register, cp, body, ns, expires_ts)
    except Refused as e:
        if isinstance(e, _Misdirected):
            expires_ts = e.expires_ts
        if expires_ts:  # a genuine nonce: used up all the same (single use); a forged one was never issued
            await cp.write(lambda conn, _ev: nonces.use(conn, body.nonce, ns, body.device_id, expires_ts))
        cp.metrics.registrations.labels("bad_nonce" if isinstance(e, BadNonce) else "refused").inc()
        raise e
    cp.metrics.registrations.labels("ok").inc()
    cp.liveness.known_online(ns, body.device_id)
    st = cp.settings
    dev = body.device_id
    # into the token cache as issued: the device's first heartbeats skip the JWT check (~0.5 ms on the loaded
    # 2-core box, per device, right when a fleet registers)
    token = device_token(cp, dev, ns)
    hb = int(cfg.get("heartbeat_interval_s") or st.default_heartbeat_s)
    return RegisterOut(
        token=token, token_expires_in=st.token_ttl_s, namespace=ns, device_id=dev,
        services={"config": f"{base}/api/v1/devices/{dev}/config",
                  "state": f"{base}/api/v1/namespaces/{ns}/devices/{dev}/shadows/default",
                  "heartbeat": f"{base}/api/v1/devices/{dev}/heartbeat",
                  "alarms": f"{base}/api/v1/devices/{dev}/alarms",
                  "ota": f"{base}/api/v1/devices/{dev}/ota",
                  "refresh": f"{base}/api/devices/refresh",
                  "ntp": advertised_ntp(st.ntp_address, base)},
        intervals={"heartbeat": hb, "ttl": ttl, "config_poll": st.config_poll_s,
                   "time_sync": int((cfg.get("time") or {}).get("interval_s") or st.time_sync_s)},
        server_time=now_ms())
