"""StateServer's data: named shadows per (namespace, device) with AWS IoT shadow semantics (routes: state_api.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import changes
from .changes import Events
from . import db as tables
from .config import latest
from .db import now_ms
from .documents import check_limits, delta, merge, stamp
from .models import ShadowUpdateIn
from .refusals import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    from .core import ControlPlane

S, D = tables.shadows, tables.devices


def render(row, ns: str | None = None) -> dict[str, Any]:
    if row is None:
        desired, reported, meta, version, ts = {}, {}, {}, 0, 0
    else:
        desired, reported, meta, version, ts = (row["desired"], row["reported"], row["meta"], row["version"],
                                                row["updated_ts"])
    return {"state": {"desired": desired, "reported": reported, "delta": delta(desired, reported)},
            "metadata": {"desired": meta.get("desired", {}), "reported": meta.get("reported", {})},
            "version": version, "timestamp": ts}


def _device_exists(conn, ns, dev) -> bool:
    return conn.execute(sa.select(D.c.device_id).where(D.c.ns == ns, D.c.device_id == dev)).first() is not None


def read_shadow(conn: sa.Connection, ns: str, dev: str, name: str) -> dict[str, Any]:
    """A shadow nobody wrote yet reads as empty at version 0 (the device's first GET after provisioning)."""
    row = conn.execute(sa.select(S).where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name)).mappings().first()
    if row is None and not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    return render(row)


#: what a relay accepts as its desired value (firmware/relays_controller.py, on_delta, accepts the same)
RELAY_VALUES = ("on", "off", True, False)


def check_desired(conn: sa.Connection, ns: str, dev: str, desired: dict[str, Any]) -> None:
    """A desired value the device could not apply is refused here, before it is stored and pushed: for a device whose
    config has `relays`, every key set (not cleared) must be one of those relays and its value "on"/"off"/true/false.

    A device with no type or config yet is not checked (nothing to check against); its firmware refuses what it cannot
    apply and reports it under `reported.rejected`."""
    cur = latest(conn, ns, dev)
    relays = cur[1].get("relays") if cur else None
    if not isinstance(relays, dict):
        return
    errors = []
    for key, v in desired.items():
        if v is None:
            continue  # clearing is always allowed (a relay removed since, a value the device reported rejected)
        if key not in relays:
            errors.append({"path": f"state.desired.{key}",
                           "message": "unknown relay (this device has: %s)" % (", ".join(sorted(relays)) or "none")})
        elif not any(v is ok if isinstance(ok, bool) else v == ok for ok in RELAY_VALUES):
            errors.append({"path": f"state.desired.{key}", "message": 'must be "on", "off", true or false'})
    if errors:
        first = errors[0]
        raise Invalid(f"{first['path']}: {first['message']}",
                      {"path": first["path"], "message": first["message"], "errors": errors[:16]})


def update_shadow(conn: sa.Connection, events: Events, cp: "ControlPlane", ns: str, dev: str, name: str,
                  body: ShadowUpdateIn) -> dict[str, Any]:
    st = cp.settings
    row = conn.execute(sa.select(S).where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name)
                       .with_for_update()).mappings().first()
    if row is None and not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    current = row["version"] if row else 0
    if body.version is not None and body.version != current:
        raise Conflict("version conflict", version=current)
    if body.state.desired and name == "default":  # the shadow the firmware acts on (protocol §4)
        check_desired(conn, ns, dev, body.state.desired)
    desired = dict(row["desired"]) if row else {}
    reported = dict(row["reported"]) if row else {}
    meta = dict(row["meta"]) if row else {}
    ts = now_ms()
    if body.state.desired is not None:
        desired = merge(desired, body.state.desired)
        meta["desired"] = stamp(meta.get("desired", {}), body.state.desired, ts)
    if body.state.reported is not None:
        reported = merge(reported, body.state.reported)
        meta["reported"] = stamp(meta.get("reported", {}), body.state.reported, ts)
    for section, doc in (("desired", desired), ("reported", reported)):
        check_limits(doc, st.max_doc_bytes, st.max_doc_depth, f"state.{section}")
    check_limits({"desired": desired, "reported": reported}, st.max_doc_bytes, st.max_doc_depth + 1, "state")
    version = current + 1
    values = {"desired": desired, "reported": reported, "meta": meta, "version": version, "updated_ts": ts}
    if row is None:
        conn.execute(S.insert().values(ns=ns, device_id=dev, name=name, **values))
    else:
        n = conn.execute(S.update().where(S.c.ns == ns, S.c.device_id == dev, S.c.name == name,
                                          S.c.version == current).values(**values)).rowcount
        if n != 1:  # only without row locks (never on PostgreSQL/SQLite as configured), but never lose an update
            raise Conflict("version conflict", version=current + 1)
    events.emit(conn, changes.state(ns, dev, name, version))
    return render(values)


def shadow_names(conn: sa.Connection, ns: str, dev: str) -> list[str]:
    if not _device_exists(conn, ns, dev):
        raise NotFound("unknown device")
    return [r[0] for r in conn.execute(sa.select(S.c.name).where(S.c.ns == ns, S.c.device_id == dev)
                                       .order_by(S.c.name))]
