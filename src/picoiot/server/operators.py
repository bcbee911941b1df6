"""Operators' data: devices (list, read, provision, move, forget), their config overrides, device types, groups.
Knows no HTTP (the routes are in operators_api.py; OTA is ota.py)."""
from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import changes
from .changes import Events
from . import db as tables
from .auth import derive_device_key
from .config import device_row, latest, recompute, recompute_where, type_row
from .db import now_ms
from .devicetypes import validate_config
from .discovery import ttl_for
from .liveness import Beat
from .models import (ConfigReport, DeviceConfigOut, DeviceOut, DevicePatch, DeviceTypeIn, DeviceTypeOut, GroupOut,
                     ProvisionIn)
from .refusals import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

D, C, TY, G, S, A = (tables.devices, tables.device_configs, tables.device_types, tables.groups, tables.shadows,
                     tables.alarms)


def device_out(row, overlay: Beat | None = None) -> DeviceOut:
    last_seen, hb = row["last_seen"], row["heartbeat"]
    if overlay is not None:  # unflushed heartbeat held in memory by this process
        last_seen, hb = max(last_seen or 0, overlay.last_seen), overlay.decoded() or hb
    return DeviceOut(namespace=row["ns"], device_id=row["device_id"], device_type=row["device_type"],
                     group=row["group_name"], firmware=row["firmware"], capabilities=row["capabilities"] or [],
                     address=row["address"], reset_cause=row["reset_cause"], online=row["online"],
                     ttl_s=row["ttl_s"], created_ts=row["created_ts"], first_seen=row["first_seen"],
                     last_seen=last_seen, registered_ts=row["registered_ts"], config_version=row["config_version"],
                     key_mode="individual" if row["device_key"] else "derived", heartbeat=hb,
                     config_report=ConfigReport(**row["config_report"]) if row["config_report"] else None)


def overlay(cp: "ControlPlane", row, before: dict[tuple[str, str], Beat] | None = None) -> Beat | None:
    """The device's newest heartbeat this process holds unflushed: now, or in `before` (taken before the read, as a
    flush may finish meanwhile)."""
    key = (row["ns"], row["device_id"])
    return cp.liveness.unflushed(*key) or (before.get(key) if before else None)


# ---------------------------------------------------------------- devices
def list_devices(conn: sa.Connection, ns: str, online: bool | None, dtype: str | None, group: str | None,
                 limit: int, offset: int) -> list:
    q = sa.select(D).where(D.c.ns == ns)
    if online is not None:
        q = q.where(D.c.online.is_(online))
    if dtype:
        q = q.where(D.c.device_type == dtype)
    if group:
        q = q.where(D.c.group_name == group)
    return list(conn.execute(q.order_by(D.c.device_id).limit(limit).offset(offset)).mappings())


def get_device(conn: sa.Connection, ns: str, dev: str):
    row = device_row(conn, ns, dev)
    if row is None:
        raise NotFound("unknown device")
    return row


def provision(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, body: ProvisionIn,
              enrollment_key: str) -> str:
    """Enroll a device; returns its key (a new individual one, or the one derived from the enrollment key)."""
    if device_row(conn, ns, body.device_id) is not None:
        raise Conflict("device exists")
    if body.device_type is not None and type_row(conn, body.device_type) is None:
        raise Invalid(f"unknown device type {body.device_type!r}", {"path": "device_type"})
    individual = secrets.token_hex(32) if body.key_mode == "individual" else None
    now = now_ms()
    conn.execute(D.insert().values(ns=ns, device_id=body.device_id, device_type=body.device_type,
                                   group_name=body.group, device_key=individual, capabilities=[], created_ts=now,
                                   online=False, ttl_s=ttl_for(cp.settings, cp.settings.default_heartbeat_s),
                                   config_overrides={}, config_version=0))
    if body.device_type:
        recompute(conn, events, cp, ns, body.device_id)
    events.emit(conn, changes.provisioned(ns, body.device_id))
    return individual or derive_device_key(enrollment_key, body.device_id)


def patch_device(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev: str, body: DevicePatch):
    row = device_row(conn, ns, dev, lock=True)
    if row is None:
        raise NotFound("unknown device")
    values: dict[str, Any] = {}
    if "group" in body.model_fields_set:
        values["group_name"] = body.group
    if "device_type" in body.model_fields_set:
        if body.device_type and type_row(conn, body.device_type) is None:
            raise Invalid(f"unknown device type {body.device_type!r}", {"path": "device_type"})
        values["device_type"] = body.device_type
    if values:
        conn.execute(D.update().where(D.c.ns == ns, D.c.device_id == dev).values(**values))
        recompute(conn, events, cp, ns, dev)  # an invalid result (Invalid) rolls the whole change back
    return device_row(conn, ns, dev)


def delete_device(conn: sa.Connection, events: Events, ns: str, dev: str) -> None:
    if conn.execute(D.delete().where(D.c.ns == ns, D.c.device_id == dev)).rowcount != 1:
        raise NotFound("unknown device")
    for t in (C, S, A):
        conn.execute(t.delete().where(t.c.ns == ns, t.c.device_id == dev))
    events.emit(conn, changes.deleted(ns, dev))


def device_config(conn: sa.Connection, ns: str, dev: str) -> DeviceConfigOut:
    """The operators' view of a device's config: effective, its own overrides, its group, its last report."""
    row = get_device(conn, ns, dev)
    cur = latest(conn, ns, dev)
    return DeviceConfigOut(version=cur[0] if cur else 0, config=cur[1] if cur else {},
                           overrides=row["config_overrides"] or {}, group=row["group_name"],
                           device_type=row["device_type"],
                           report=ConfigReport(**row["config_report"]) if row["config_report"] else None)


# ---------------------------------------------------------------- device types (global)
def type_out(r) -> DeviceTypeOut:
    return DeviceTypeOut(name=r["name"], json_schema=r["json_schema"], defaults=r["defaults"], version=r["version"],
                         updated_ts=r["updated_ts"])


def list_types(conn: sa.Connection) -> list:
    return list(conn.execute(sa.select(TY).order_by(TY.c.name)).mappings())


def put_type(conn: sa.Connection, events: Events, cp: "ControlPlane", name: str, body: DeviceTypeIn):
    validate_config(body.json_schema, body.defaults)
    row = conn.execute(sa.select(TY).where(TY.c.name == name).with_for_update()).mappings().first()
    now = now_ms()
    version = (row["version"] + 1) if row else 1
    candidate = {"name": name, "json_schema": body.json_schema, "defaults": body.defaults}
    if row is None:
        conn.execute(TY.insert().values(version=version, updated_ts=now, **candidate))
    else:
        conn.execute(TY.update().where(TY.c.name == name).values(version=version, updated_ts=now,
                                                                  json_schema=body.json_schema,
                                                                  defaults=body.defaults))
    recompute_where(conn, events, cp, D.c.device_type == name, type_override=candidate)
    return type_row(conn, name)


# ---------------------------------------------------------------- groups
def group_out(r) -> GroupOut:
    return GroupOut(namespace=r["ns"], name=r["name"], overrides=r["overrides"], updated_ts=r["updated_ts"])


def list_groups(conn: sa.Connection, ns: str) -> list:
    return list(conn.execute(sa.select(G).where(G.c.ns == ns).order_by(G.c.name)).mappings())


def put_group(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, name: str, overrides: dict):
    row = conn.execute(sa.select(G).where(G.c.ns == ns, G.c.name == name).with_for_update()).first()
    now = now_ms()
    if row is None:
        conn.execute(G.insert().values(ns=ns, name=name, overrides=overrides, updated_ts=now))
    else:
        conn.execute(G.update().where(G.c.ns == ns, G.c.name == name).values(overrides=overrides, updated_ts=now))
    recompute_where(conn, events, cp, sa.and_(D.c.ns == ns, D.c.group_name == name), group_override=overrides)
    return conn.execute(sa.select(G).where(G.c.ns == ns, G.c.name == name)).mappings().first()


def delete_group(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, name: str) -> None:
    if conn.execute(G.delete().where(G.c.ns == ns, G.c.name == name)).rowcount != 1:
        raise NotFound("unknown group")
    members = [r[0] for r in conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.group_name == name))]
    conn.execute(D.update().where(D.c.ns == ns, D.c.group_name == name).values(group_name=None))
    if members:
        recompute_where(conn, events, cp, sa.and_(D.c.ns == ns, D.c.device_id.in_(members)))
