"""ConfigurationServer's data: effective config = type defaults ⊕ group ⊕ device overrides, versioned and
schema-checked (routes: config_api.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import changes
from .changes import Events
from . import db as tables
from .db import now_ms
from .devicetypes import validate_config
from .documents import merge, overlay
from .models import ConfigReportIn
from .refusals import Conflict, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

D, C, TY, G = tables.devices, tables.device_configs, tables.device_types, tables.groups


def device_row(conn: sa.Connection, ns: str, dev: str, lock: bool = False):
    q = sa.select(D).where(D.c.ns == ns, D.c.device_id == dev)
    if lock:
        q = q.with_for_update()
    return conn.execute(q).mappings().first()


def type_row(conn: sa.Connection, name: str):
    return conn.execute(sa.select(TY).where(TY.c.name == name)).mappings().first()


def effective(conn: sa.Connection, ns: str, dev_row, type_override=None, group_override=None) -> tuple[dict, dict]:
    """(config, schema) of a device; the overrides let a caller test a type/group change before storing it."""
    t = type_override or type_row(conn, dev_row["device_type"])
    if t is None:
        raise Conflict(f"device {dev_row['device_id']} has unknown device type {dev_row['device_type']!r}")
    cfg = t["defaults"]
    if dev_row["group_name"]:
        if group_override is not None:
            g = group_override
        else:
            g = conn.execute(sa.select(G.c.overrides).where(G.c.ns == ns, G.c.name == dev_row["group_name"])).scalar()
        if g:
            cfg = merge(cfg, g)
    if dev_row["config_overrides"]:
        cfg = merge(cfg, dev_row["config_overrides"])
    return cfg, t["json_schema"]


def latest(conn: sa.Connection, ns: str, dev: str) -> tuple[int, dict] | None:
    row = conn.execute(sa.select(C.c.version, C.c.config).where(C.c.ns == ns, C.c.device_id == dev)
                       .order_by(C.c.version.desc()).limit(1)).first()
    return (int(row[0]), row[1]) if row else None


def store_if_changed(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev_row,
                     cfg: dict, schema: dict, check_unchanged: bool = True) -> int:
    """Validate and store cfg as a new version if it differs from the latest; returns the current version.

    check_unchanged=False skips the schema check of a config equal to the stored one (registration: it was checked
    when stored, and a change of the type or a group rechecks every device it touches)."""
    dev = dev_row["device_id"]
    if check_unchanged:
        validate_config(schema, cfg, dev)
    cur = latest(conn, ns, dev)
    if cur is not None and cur[1] == cfg:
        return cur[0]
    if not check_unchanged:
        validate_config(schema, cfg, dev)
    version = max(cur[0] if cur else 0, dev_row["config_version"]) + 1
    conn.execute(C.insert().values(ns=ns, device_id=dev, version=version, config=cfg, created_ts=now_ms()))
    conn.execute(D.update().where(D.c.ns == ns, D.c.device_id == dev).values(config_version=version))
    events.emit(conn, changes.config(ns, dev, version))
    return version


def recompute(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev: str) -> int | None:
    row = device_row(conn, ns, dev, lock=True)
    if row is None:
        raise NotFound("unknown device")
    if not row["device_type"]:
        return None
    cfg, schema = effective(conn, ns, row)
    return store_if_changed(conn, events, cp, ns, row, cfg, schema)


def recompute_where(conn: sa.Connection, events: Events, cp: "ControlPlane", where, type_override=None,
                    group_override=None) -> int:
    """Recompute every matching device; one invalid result aborts the whole change (422 naming the device)."""
    n = 0
    for row in conn.execute(sa.select(D).where(where, D.c.device_type.is_not(None)).with_for_update()).mappings():
        t = type_override if type_override is not None and row["device_type"] == type_override["name"] else None
        cfg, schema = effective(conn, row["ns"], row, t, group_override)
        store_if_changed(conn, events, cp, row["ns"], row, cfg, schema)
        n += 1
    return n


def set_overrides(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev: str,
                  overrides: dict[str, Any], patch: bool) -> tuple[int | None, dict]:
    row = device_row(conn, ns, dev, lock=True)
    if row is None:
        raise NotFound("unknown device")
    new = overlay(row["config_overrides"] or {}, overrides) if patch else overrides
    candidate = dict(row)
    candidate["config_overrides"] = new
    version = None
    if row["device_type"]:
        cfg, schema = effective(conn, ns, candidate)
        version = store_if_changed(conn, events, cp, ns, candidate, cfg, schema)
    conn.execute(D.update().where(D.c.ns == ns, D.c.device_id == dev).values(config_overrides=new))
    return version, new


def save_report(conn: sa.Connection, events: Events, ns: str, dev: str, body: ConfigReportIn) -> None:
    report = {"version": body.version, "status": body.status, "reason": body.reason, "ts": now_ms()}
    n = conn.execute(D.update().where(D.c.ns == ns, D.c.device_id == dev).values(config_report=report)).rowcount
    if not n:
        raise NotFound("unknown device")


def versions_diff(conn: sa.Connection, ns: str, dev: str) -> dict:
    """The device's current config version and the leaves that changed from the previous one (the dashboard's
    config diff)."""
    c = C
    rows = conn.execute(sa.select(c.c.version, c.c.config, c.c.created_ts).where(c.c.ns == ns, c.c.device_id == dev)
                        .order_by(c.c.version.desc()).limit(2)).all()
    cur = rows[0] if rows else None
    prev = rows[1] if len(rows) > 1 else None
    return {"version": cur[0] if cur else 0, "previous_version": prev[0] if prev else None,
            "created_ts": cur[2] if cur else None,
            "diff": diff(prev[1] if prev else {}, cur[1] if cur else {})}


def diff(a: Any, b: Any, path: str = "") -> list[dict]:
    """[{path, before, after}] of the leaves that differ between two JSON documents."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[dict] = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append({"path": sub, "before": None, "after": b[k]})
            elif k not in b:
                out.append({"path": sub, "before": a[k], "after": None})
            else:
                out.extend(diff(a[k], b[k], sub))
        return out
    return [] if a == b else [{"path": path, "before": a, "after": b}]
