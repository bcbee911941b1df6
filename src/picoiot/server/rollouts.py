"""Staged OTA rollouts (docs/ota.md, *Rollouts*): the data part, no HTTP (the router is rollouts_api.py).

A rollout takes one release to a target in cumulative stages. It offers the release through the OTA service's own
mechanism — a device assignment (ota_assignments) per device of a started stage — and derives each device's progress
from what devices already send: the manifest fetch (downloading), the re-registration after the install reset
(installed: the new set is booting on trial), the OTA report (`installed` → trial, the rollout's soak; `rolled_back`,
`failed`) and liveness (offline during the soak → failed). No firmware change is needed.

Every change runs in one transaction that locks the rollout row, so several server processes on one PostgreSQL
evaluate a rollout one at a time and agree on its state; `rollout_locks` (primary key ns + device) makes "one active
rollout per device" hold across processes too.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import sqlalchemy as sa
from packaging.version import InvalidVersion, Version

from . import changes
from .changes import Events
from . import db as tables
from .db import now_ms
from .refusals import Conflict, Invalid, NotFound

RO, RD, RL = tables.rollouts, tables.rollout_devices, tables.rollout_locks
AS, REP, D, R = tables.ota_assignments, tables.ota_reports, tables.devices, tables.ota_releases

#: a device's statuses; the last four are final for its stage
OFFERED = ("pending", "downloading", "installed", "trial")
FAILURES = ("rolled_back", "failed")
FINAL = ("committed", "rolled_back", "failed", "skipped")
ACTIVE = ("running", "paused")


def _order(v: str | None) -> Version | None:
    try:
        return Version(v) if v else None
    except InvalidVersion:
        return None


def downgrade_reason(running: str | None, target: str) -> str | None:
    """Why a device running `running` must not be offered `target` without allow_downgrade, or None."""
    if running is None:
        return None
    if running == target:
        return f"already running {target}"
    a, b = _order(running), _order(target)
    if a is None or b is None:
        return f"cannot order versions {running!r} and {target!r}: would need allow_downgrade"
    if a >= b:
        return f"running {running} ≥ {target}: no downgrade"
    return None


def check_stages(stages: list[dict]) -> None:
    """Stages are cumulative: `devices` (an absolute count, only before any percent) or `percent` (of the target,
    strictly increasing), the last one 100 %. Invalid naming the field."""
    last_pct = 0.0
    for i, s in enumerate(stages):
        if "percent" in s and s.get("percent") is not None:
            p = s["percent"]
            if not last_pct < p <= 100:
                raise Invalid("stage percentages must increase up to 100", {"path": f"stages.{i}.percent"})
            last_pct = p
        elif s.get("devices") is not None:
            if last_pct:
                raise Invalid("a device-count stage must come before the percentage stages",
                              {"path": f"stages.{i}.devices"})
        else:
            raise Invalid("a stage needs percent or devices", {"path": f"stages.{i}"})
    if last_pct != 100:
        raise Invalid("stage percentages do not add up: the last stage must be 100",
                      {"path": f"stages.{len(stages) - 1}.percent"})


def stage_sizes(stages: list[dict], n: int) -> list[int]:
    """Cumulative device counts per stage for a target of n devices (each stage at least one more while any left)."""
    out, prev = [], 0
    for s in stages:
        want = s["devices"] if s.get("devices") is not None else math.ceil(s["percent"] * n / 100)
        size = min(n, max(want, prev + 1 if prev < n else prev))
        out.append(size)
        prev = size
    return out


def _spread(ns: str, devices: list[str]) -> list[str]:
    """A stable order that is not the alphabetical one, so that a first stage is not always the same device family."""
    return sorted(devices, key=lambda d: hashlib.sha256(f"{ns}/{d}".encode()).digest())


def resolve_target(conn: sa.Connection, ns: str, target: dict) -> list[str]:
    q = sa.select(D.c.device_id).where(D.c.ns == ns)
    if target.get("group") is not None:
        g = tables.groups
        if conn.execute(sa.select(g.c.name).where(g.c.ns == ns, g.c.name == target["group"])).first() is None:
            raise NotFound("unknown group", {"path": "target.group"})
        q = q.where(D.c.group_name == target["group"])
    elif target.get("devices") is not None:
        wanted = list(dict.fromkeys(target["devices"]))
        found = {r[0] for r in conn.execute(q.where(D.c.device_id.in_(wanted)))}
        missing = [d for d in wanted if d not in found]
        if missing:
            raise NotFound("unknown device", {"path": "target.devices", "devices": missing[:20]})
        return wanted
    return [r[0] for r in conn.execute(q)]


def _running(conn: sa.Connection, ns: str, devs: list[str]) -> dict[str, str | None]:
    """What each device runs, by the OTA service's rule (ota.device_view): the last installed report, else the
    version it rolled back to, else its heartbeat's / registration's firmware."""
    out: dict[str, str | None] = {}
    for i in range(0, len(devs), 500):
        chunk = devs[i:i + 500]
        for dev, fw, hb in conn.execute(sa.select(D.c.device_id, D.c.firmware, D.c.heartbeat)
                                        .where(D.c.ns == ns, D.c.device_id.in_(chunk))):
            out[dev] = (hb or {}).get("firmware") or fw
        for dev, ver, st, run in conn.execute(sa.select(REP.c.device_id, REP.c.version, REP.c.status, REP.c.running)
                                              .where(REP.c.ns == ns, REP.c.device_id.in_(chunk))):
            if st == "installed":
                out[dev] = ver
            elif st == "rolled_back" and run:
                out[dev] = run
    return out


def _assign(conn: sa.Connection, ns: str, dev: str, version: str, now: int) -> None:
    conn.execute(AS.delete().where(AS.c.ns == ns, AS.c.kind == "device", AS.c.target == dev))
    conn.execute(AS.insert().values(ns=ns, kind="device", target=dev, version=version, assigned_ts=now))


def _withdraw(conn: sa.Connection, r: dict, now: int) -> int:
    """Devices offered the release that have not started (still pending): the offer is taken back, they keep their
    version. Devices already downloading or installing go on (a device cannot be stopped mid-swap)."""
    rows = conn.execute(sa.select(RD.c.device_id).where(RD.c.rollout_id == r["id"], RD.c.status == "pending",
                                                        RD.c.offered_ts.is_not(None))).all()
    for (dev,) in rows:
        conn.execute(AS.delete().where(AS.c.ns == r["ns"], AS.c.kind == "device", AS.c.target == dev,
                                       AS.c.version == r["version"]))
    conn.execute(RD.update().where(RD.c.rollout_id == r["id"], RD.c.status == "pending")
                 .values(offered_ts=None, status_ts=now))
    return len(rows)


def _offer_stages(conn: sa.Connection, events: Events, r: dict, upto: int, now: int) -> int:
    """Offer the release to every pending device of stages ≤ upto that was not offered yet. Each offer wakes the
    device's held heartbeat in every process (the same event an operator's assignment makes, ota.assignment_changed):
    the device hears of it at once, not at its next heartbeat."""
    rows = conn.execute(sa.select(RD.c.device_id, RD.c.version).where(
        RD.c.rollout_id == r["id"], RD.c.stage <= upto, RD.c.status == "pending", RD.c.offered_ts.is_(None))).all()
    for dev, version in rows:
        _assign(conn, r["ns"], dev, version, now)
        events.emit(conn, changes.ota(r["ns"], dev))
    if rows:
        conn.execute(RD.update().where(RD.c.rollout_id == r["id"], RD.c.stage <= upto, RD.c.status == "pending",
                                       RD.c.offered_ts.is_(None)).values(offered_ts=now, status_ts=now))
    return len(rows)


def _release_locks(conn: sa.Connection, r: dict) -> None:
    conn.execute(RL.delete().where(RL.c.rollout_id == r["id"]))


def _release_exists(conn: sa.Connection, ns: str, version: str) -> bool:
    return conn.execute(sa.select(R.c.version).where(R.c.ns == ns, R.c.version == version)).first() is not None


def create(conn: sa.Connection, events: Events, ns: str, spec: dict, by: str) -> dict:
    """spec: {version, target: {namespace|group|devices}, stages, failure_threshold, allow_downgrade}."""
    version = spec["version"]
    if not _release_exists(conn, ns, version):
        raise NotFound("unknown release", {"path": "version", "version": version})
    check_stages(spec["stages"])
    devs = resolve_target(conn, ns, spec["target"])
    if not devs:
        raise Invalid("the target holds no device", {"path": "target"})
    busy = conn.execute(sa.select(RL.c.device_id, RL.c.rollout_id).where(RL.c.ns == ns, RL.c.device_id.in_(devs))
                        .limit(20)).all()
    if busy:
        raise Conflict("device already in an active rollout",
                       {"path": "target", "devices": {d: rid for d, rid in busy}})
    now = now_ms()
    rid = conn.execute(RO.insert().values(
        ns=ns, version=version, target=spec["target"], stages=spec["stages"],
        failure_threshold=spec["failure_threshold"], allow_downgrade=spec["allow_downgrade"], state="running",
        stage=0, reason=None, created_by=by, created_ts=now, updated_ts=now, stage_started_ts=now)
    ).inserted_primary_key[0]
    # one active rollout per device, also against a concurrent create in another process (IntegrityError → retried
    # by ControlPlane.write, whose retry then sees the winner's locks and answers 409)
    conn.execute(RL.insert(), [{"ns": ns, "device_id": d, "rollout_id": rid} for d in devs])
    running = _running(conn, ns, devs)
    order = _spread(ns, devs)
    sizes = stage_sizes(spec["stages"], len(order))
    rows, start = [], 0
    for stage, end in enumerate(sizes):
        for dev in order[start:end]:
            why = None if spec["allow_downgrade"] and running.get(dev) != version else downgrade_reason(
                running.get(dev), version)
            rows.append({"rollout_id": rid, "ns": ns, "device_id": dev, "stage": stage, "version": version,
                         "from_version": running.get(dev), "status": "skipped" if why else "pending",
                         "reason": why, "offered_ts": None, "status_ts": now})
        start = end
    conn.execute(RD.insert(), rows)
    r = _load(conn, ns, rid, lock=False)
    _offer_stages(conn, events, r, 0, now)
    _evaluate(conn, events, r, now)
    return detail(conn, ns, rid)


def _load(conn: sa.Connection, ns: str, rid: int, lock: bool = True) -> dict:
    q = sa.select(RO).where(RO.c.ns == ns, RO.c.id == rid)
    row = conn.execute(q.with_for_update() if lock else q).mappings().first()
    if row is None:
        raise NotFound("unknown rollout")
    return dict(row)


def _set(conn: sa.Connection, r: dict, now: int, **values: Any) -> None:
    values["updated_ts"] = now
    conn.execute(RO.update().where(RO.c.id == r["id"]).values(**values))
    r.update(values)


# ---------------------------------------------------------------- evaluation
def _refresh_devices(conn: sa.Connection, r: dict, now: int) -> None:
    """Move each offered device along from what it reported, and fail a device that went offline on trial."""
    rows = conn.execute(sa.select(RD).where(RD.c.rollout_id == r["id"], RD.c.status.in_(OFFERED),
                                            RD.c.offered_ts.is_not(None))).mappings().all()
    if not rows:
        return
    ids = [x["device_id"] for x in rows]
    reps = {x["device_id"]: x for x in conn.execute(sa.select(REP).where(REP.c.ns == r["ns"],
                                                                          REP.c.device_id.in_(ids))).mappings()}
    devs = {x[0]: x for x in conn.execute(sa.select(D.c.device_id, D.c.online, D.c.registered_ts)
                                          .where(D.c.ns == r["ns"], D.c.device_id.in_(ids)))}
    soak_ms = int(r["stages"][min(r["stage"], len(r["stages"]) - 1)].get("soak_s", 0) * 1000)
    for x in rows:
        dev, status, ts = x["device_id"], x["status"], x["status_ts"]
        new, reason, new_ts = status, x["reason"], ts
        rep, d = reps.get(dev), devs.get(dev)
        if d is None:
            new, reason = "failed", "device deleted"
        elif rep is not None and rep["version"] == x["version"] and rep["ts"] >= x["offered_ts"]:
            if rep["status"] == "installed" and status != "trial":
                new, reason, new_ts = "trial", None, rep["ts"]
            elif rep["status"] in FAILURES:
                new, reason = rep["status"], rep["reason"] or rep["status"]
        elif status == "downloading" and (d[2] or 0) > ts:
            new, new_ts = "installed", d[2]  # re-registered after the install reset: the new set is on trial
        if new in ("installed", "trial") and d is not None and not d[1]:
            new, reason = "failed", f"offline during trial ({status})"
        elif new == "trial" and now - new_ts >= soak_ms:
            new = "committed"
        if new != status:
            conn.execute(RD.update().where(RD.c.rollout_id == r["id"], RD.c.device_id == dev).values(
                status=new, reason=reason, status_ts=new_ts if new in ("installed", "trial") else now))


def _evaluate(conn: sa.Connection, events: Events, r: dict, now: int) -> None:
    _refresh_devices(conn, r, now)
    if r["state"] != "running":
        return
    while True:
        counts: dict[str, int] = {}
        fails = []
        for dev, status, reason, ts in conn.execute(sa.select(RD.c.device_id, RD.c.status, RD.c.reason, RD.c.status_ts)
                                                    .where(RD.c.rollout_id == r["id"], RD.c.stage == r["stage"])):
            counts[status] = counts.get(status, 0) + 1
            if status in FAILURES and ts >= r["stage_started_ts"]:  # failures before a resume were accepted
                fails.append(f"{dev}: {status} ({reason})")
        n = sum(v for k, v in counts.items() if k != "skipped")
        if n and len(fails) / n > r["failure_threshold"]:
            reason = (f"stage {r['stage'] + 1}: {len(fails)} of {n} devices failed (> {r['failure_threshold']:g}): "
                      + "; ".join(fails[:5]))
            _set(conn, r, now, state="paused", reason=reason[:512])
            _withdraw(conn, r, now)
            return
        if any(k not in FINAL for k in counts):
            return
        if r["stage"] + 1 >= len(r["stages"]):
            _set(conn, r, now, state="completed", reason=None)
            _release_locks(conn, r)
            return
        _set(conn, r, now, stage=r["stage"] + 1, stage_started_ts=now)
        _offer_stages(conn, events, r, r["stage"], now)


def tick(conn: sa.Connection, events: Events, now: int | None = None) -> set[str]:
    """One evaluation of every active rollout; returns their namespaces. Rows another process is evaluating are
    skipped (PostgreSQL SKIP LOCKED; SQLite's writer lock already serialises)."""
    now = now or now_ms()
    q = sa.select(RO).where(RO.c.state.in_(ACTIVE)).order_by(RO.c.id).with_for_update(skip_locked=True)
    active = [dict(x) for x in conn.execute(q).mappings()]
    for r in active:
        _evaluate(conn, events, r, now)
    return {r["ns"] for r in active}


def note_download(conn: sa.Connection, events: Events, ns: str, dev: str, version: str) -> None:
    """The device fetched the manifest of the release its rollout offered: it is downloading."""
    now = now_ms()
    conn.execute(RD.update().where(RD.c.ns == ns, RD.c.device_id == dev, RD.c.version == version,
                                   RD.c.status == "pending", RD.c.offered_ts.is_not(None),
                                   RD.c.rollout_id.in_(sa.select(RL.c.rollout_id).where(
                                       RL.c.ns == ns, RL.c.device_id == dev)))
                 .values(status="downloading", status_ts=now))


# ---------------------------------------------------------------- operators' actions
def pause(conn: sa.Connection, events: Events, ns: str, rid: int, reason: str) -> dict:
    r = _load(conn, ns, rid)
    if r["state"] not in ACTIVE:
        raise Conflict(f"rollout is {r['state']}", {"state": r["state"]})
    now = now_ms()
    _refresh_devices(conn, r, now)
    if r["state"] == "running":
        _set(conn, r, now, state="paused", reason=reason[:512])
        _withdraw(conn, r, now)
    return detail(conn, ns, rid)


def resume(conn: sa.Connection, events: Events, ns: str, rid: int, version: str | None) -> dict:
    """Run again. With a (fixed) release: devices of the started stages that failed, rolled back or committed the
    old one are taken to the new one; a device is never offered again the release it rolled back."""
    r = _load(conn, ns, rid)
    if r["state"] not in ACTIVE:
        raise Conflict(f"rollout is {r['state']}", {"state": r["state"]})
    now = now_ms()
    _refresh_devices(conn, r, now)
    if version is not None and version != r["version"]:
        if not _release_exists(conn, ns, version):
            raise NotFound("unknown release", {"path": "version", "version": version})
        devs = [x[0] for x in conn.execute(sa.select(RD.c.device_id).where(RD.c.rollout_id == rid))]
        running = _running(conn, ns, devs)
        for dev, status in conn.execute(sa.select(RD.c.device_id, RD.c.status).where(RD.c.rollout_id == rid)).all():
            if status in ("downloading", "installed", "trial"):
                continue  # mid-install of the old release: its outcome decides, then the operator resumes again
            why = None if r["allow_downgrade"] and running.get(dev) != version else downgrade_reason(
                running.get(dev), version)
            conn.execute(RD.update().where(RD.c.rollout_id == rid, RD.c.device_id == dev).values(
                version=version, from_version=running.get(dev), status="skipped" if why else "pending",
                reason=why, offered_ts=None, status_ts=now))
        _set(conn, r, now, version=version)
    _set(conn, r, now, state="running", reason=None, stage_started_ts=now)
    _offer_stages(conn, events, r, r["stage"], now)
    _evaluate(conn, events, r, now)
    return detail(conn, ns, rid)


def abort(conn: sa.Connection, events: Events, ns: str, rid: int, reason: str) -> dict:
    r = _load(conn, ns, rid)
    if r["state"] not in ACTIVE:
        raise Conflict(f"rollout is {r['state']}", {"state": r["state"]})
    now = now_ms()
    _refresh_devices(conn, r, now)
    _withdraw(conn, r, now)
    _set(conn, r, now, state="aborted", reason=reason[:512])
    _release_locks(conn, r)
    return detail(conn, ns, rid)


# ---------------------------------------------------------------- views
def summary(r: dict) -> dict:
    return {"id": r["id"], "namespace": r["ns"], "version": r["version"], "target": r["target"],
            "stages": r["stages"], "failure_threshold": r["failure_threshold"],
            "allow_downgrade": r["allow_downgrade"], "state": r["state"], "stage": r["stage"], "reason": r["reason"],
            "created_by": r["created_by"], "created_ts": r["created_ts"], "updated_ts": r["updated_ts"]}


def detail(conn: sa.Connection, ns: str, rid: int) -> dict:
    r = _load(conn, ns, rid, lock=False)
    out = summary(r)
    stages = [{"stage": i, **s, "devices": 0, "counts": {}} for i, s in enumerate(r["stages"])]
    devices = []
    for x in conn.execute(sa.select(RD).where(RD.c.rollout_id == rid).order_by(RD.c.stage, RD.c.device_id)).mappings():
        st = stages[x["stage"]]
        st["devices"] += 1
        st["counts"][x["status"]] = st["counts"].get(x["status"], 0) + 1
        devices.append({"device_id": x["device_id"], "stage": x["stage"], "status": x["status"],
                        "reason": x["reason"], "version": x["version"], "from_version": x["from_version"],
                        "status_ts": x["status_ts"]})
    out["stage_detail"] = stages
    out["devices"] = devices
    return out


def list_rollouts(conn: sa.Connection, ns: str, state: str | None) -> list[dict]:
    q = sa.select(RO).where(RO.c.ns == ns)
    if state:
        q = q.where(RO.c.state == state)
    return [summary(dict(x)) for x in conn.execute(q.order_by(RO.c.id.desc()).limit(200)).mappings()]
