"""`create_app(settings)`: the whole control plane as one FastAPI app; services can also be mounted one by one."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Iterable

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI

from . import alarms_api, alerting_api, audit_api, config_api, discovery_api, events_api, heartbeat_api, operators_api, ops
from . import ota_api, rollouts_api, state_api, telemetry_api, ui
from . import db as tables
from . import errors, openapi
from .admission import Admission
from .fleet import Fleet
from .hotpath import HotPath
from .core import ControlPlane
from .db import migrate, now_ms
from .devicetypes import BUILTIN
from .metrics import MetricsAndLimits
from .settings import Settings

log = logging.getLogger("picoiot.server")

#: every service's router, by name (create_app(services=[…]) mounts a subset)
SERVICES: dict[str, APIRouter] = {
    "discovery": discovery_api.router,
    "config": config_api.router,
    "state": state_api.router,
    "heartbeat": heartbeat_api.router,
    "alarms": alarms_api.router,
    "ota": ota_api.router,
    "rollouts": rollouts_api.router,
    "alerting": alerting_api.router,
    "operators": operators_api.router,
    "ops": ops.router,
    "telemetry": telemetry_api.router,
    "audit": audit_api.router,
    "events": events_api.router,
    "ui": ui.router,
}


def seed_device_types(conn: sa.Connection) -> None:
    """Install the built-in types if missing (an admin may have replaced them: never overwrite)."""
    t = tables.device_types
    for name, (schema, defaults) in BUILTIN.items():
        if conn.execute(sa.select(t.c.name).where(t.c.name == name)).first() is None:
            conn.execute(t.insert().values(name=name, json_schema=schema, defaults=defaults, version=1,
                                           updated_ts=now_ms()))


def refreeze_if_grown(cp: ControlPlane) -> bool:
    """Freeze again once the per-device caches have grown by `gc_refreeze_entries` (or 10 %) since the last freeze.

    A fleet registering after start-up fills the token and version caches with long-lived objects the start-up
    freeze did not see; with 20,000 devices each full collection then walked them for 30–70 ms, found nothing
    (collected 0) and stalled every heartbeat behind it — the heartbeat p99 (docs/benchmarks.md). Freezing without
    a collection first also keeps whatever young garbage cycles exist at that moment (a few per freeze, and the
    freezes are logarithmic in the fleet size); objects freed by reference counting are freed as ever."""
    step = cp.settings.gc_refreeze_entries
    n = len(cp.tokens) + len(cp.versions)
    if step <= 0 or n - cp.frozen_entries < max(step, cp.frozen_entries // 10):
        return False
    gc.freeze()
    cp.frozen_entries = n
    return True


async def _telemetry_loop(cp: ControlPlane) -> None:
    """Write buffered readings every telemetry_flush_s; expire old ones once a minute. A task of its own: a slow
    telemetry write never delays the liveness flush and sweep (heartbeats)."""
    last_expiry = float("-inf")
    while True:
        await asyncio.sleep(cp.settings.telemetry_flush_s)
        try:
            await cp.telemetry.flush()
            now = asyncio.get_running_loop().time()
            if now - last_expiry >= cp.settings.telemetry_expire_s:
                last_expiry = now
                await cp.telemetry.expire()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # kept in memory and retried (telemetry.flush)
            cp.metrics.housekeeping_errors.inc()
            log.warning("telemetry flush failed: %s", type(e).__name__)


async def _housekeeping(cp: ControlPlane) -> None:
    while True:
        await asyncio.sleep(min(cp.settings.sweep_interval_s, cp.settings.heartbeat_flush_s or 1e9))
        refreeze_if_grown(cp)
        try:
            await cp.liveness.housekeeping()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a database hiccup must not end the sweeper
            cp.metrics.housekeeping_errors.inc()
            log.warning("housekeeping failed: %s", type(e).__name__)


def create_app(settings: Settings | None = None, services: Iterable[str] | None = None) -> FastAPI:
    settings = settings or Settings()
    cp = ControlPlane(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(migrate, cp.db.engine, settings)
        await cp.db.run(seed_device_types)
        cp.started_ms = now_ms()
        await cp.notifier.start()
        await cp.warm_versions()  # after LISTEN starts: a change committed meanwhile reaches the cache as an event
        # Everything loaded so far (modules, FastAPI's routes and models, SQLAlchemy's tables, the warm caches) lives
        # as long as the process: out of the collector's sight, a full collection no longer walks it and stalls
        # the event loop for 50–80 ms (docs/benchmarks.md, Control plane load).
        gc.collect()
        gc.freeze()
        cp.frozen_entries = len(cp.tokens) + len(cp.versions)
        task = asyncio.create_task(_housekeeping(cp))
        fleet = Fleet(cp)
        if "rollouts" in mounted or "alerting" in mounted:
            fleet.start()
        tm_task = asyncio.create_task(_telemetry_loop(cp))
        try:
            yield
        finally:
            await fleet.stop()
            task.cancel()
            tm_task.cancel()
            for t in (task, tm_task):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(Exception):
                await cp.liveness.flush()  # a clean stop keeps every heartbeat
            with contextlib.suppress(Exception):
                await cp.telemetry.flush()  # and every reading
            await cp.notifier.stop()
            cp.db.dispose()

    # FastAPI's native OpenTelemetry hooks are off: metrics are Prometheus (/metrics), and with them on FastAPI reads
    # the global OTel providers on every request (~25 µs, a tenth of a heartbeat's cost)
    app = FastAPI(title="picoiot control plane", version="0.1.0", lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  description="Discovery, configuration, state, heartbeat and alarms for picoiot devices "
                              "(docs/protocol.md, docs/control-plane.md).")
    app.state.cp = cp
    errors.install(app)
    openapi.install(app)
    for name in services or SERVICES:
        app.include_router(SERVICES[name])
    # innermost: records operator writes (audit_api.py) inside the body-size limit
    app.add_middleware(audit_api.AuditTrail, cp=cp)
    app.add_middleware(MetricsAndLimits, metrics=cp.metrics, max_body=settings.max_body_bytes)
    mounted = set(services or SERVICES)
    # outside FastAPI's own layers, inside admission control; see hotpath.py
    app.add_middleware(HotPath, cp=cp, health="ops" in mounted, heartbeats="heartbeat" in mounted,
                       registrations="discovery" in mounted)
    # outermost: a refused request costs as little as possible
    app.add_middleware(Admission, metrics=cp.metrics, max_requests=settings.max_requests_in_flight,
                       max_longpolls=settings.max_longpolls, max_registrations=settings.max_registrations_in_flight)
    return app
