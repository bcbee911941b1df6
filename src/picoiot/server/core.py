"""The control plane's shared parts (settings, database, notifier, caches, metrics) and the write helper."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from . import db as tables
from . import changes
from .changes import Change, Events
from .db import Database
from .metrics import Metrics
from .notifier import Notifier, make_notifier
from .settings import Settings

T = TypeVar("T")


class Versions:
    """What the heartbeat answers of one device without a query: its config version, its default shadow's version,
    and its TTL. Versions only grow (`advance`), so an event applied twice or late is harmless."""

    __slots__ = ("config_version", "state_version", "ttl_s")

    def __init__(self, config_version: int, state_version: int, ttl_s: int) -> None:
        self.config_version = config_version
        self.state_version = state_version
        self.ttl_s = ttl_s

    def advance(self, config_version: int, state_version: int) -> None:
        self.config_version = max(self.config_version, config_version)
        self.state_version = max(self.state_version, state_version)

    def __repr__(self) -> str:
        return f"Versions({self.config_version}, {self.state_version}, ttl_s={self.ttl_s})"


class VersionCache:
    """(ns, device) → Versions: what the heartbeat answers as `pending`, without a query.

    Filled at start-up with one query over all devices (`load_all_versions`), then by registration events (which carry
    the device's versions, so every process learns of a new device through NOTIFY) and, for anything else (a resync,
    a device provisioned but not yet registered), on first use from the database. Kept current by change events (local
    and, on PostgreSQL, from the other processes through NOTIFY).
    """

    def __init__(self) -> None:
        self._v: dict[tuple[str, str], Versions] = {}

    def on_event(self, e: Change) -> None:
        if e["kind"] == "resync":
            self._v.clear()
            return
        key = (e["ns"], e["dev"])
        if e["kind"] == "deleted":
            self._v.pop(key, None)
            return
        entry = self._v.get(key)
        if changes.is_registration(e):
            if entry is None:  # warm the entry for its heartbeats
                self.put(*key, int(e["config_version"]), int(e["state_version"]), int(e["ttl"]))
            else:
                entry.advance(int(e["config_version"]), int(e["state_version"]))
                entry.ttl_s = int(e["ttl"])
        elif entry is None:
            return
        elif e["kind"] == "config":
            entry.advance(int(e["version"]), 0)
        elif e["kind"] == "state" and e.get("name") == "default":
            entry.advance(0, int(e["version"]))

    def get(self, ns: str, dev: str) -> Versions | None:
        return self._v.get((ns, dev))

    def put(self, ns: str, dev: str, config_version: int, state_version: int, ttl_s: int) -> Versions:
        entry = Versions(config_version, state_version, ttl_s)
        self._v[(ns, dev)] = entry
        return entry

    def __len__(self) -> int:
        return len(self._v)


def versions_query() -> sa.Select:
    d, s = tables.devices, tables.shadows
    return (sa.select(d.c.ns, d.c.device_id, d.c.config_version, s.c.version, d.c.ttl_s)
            .select_from(d.outerjoin(s, sa.and_(s.c.ns == d.c.ns, s.c.device_id == d.c.device_id,
                                                s.c.name == "default"))))


def load_versions(conn: sa.Connection, ns: str, dev: str) -> tuple[int, int, int] | None:
    d = tables.devices
    row = conn.execute(versions_query().where(d.c.ns == ns, d.c.device_id == dev)).first()
    if row is None:
        return None
    return int(row[2]), int(row[3] or 0), int(row[4])


def load_all_versions(conn: sa.Connection) -> list[tuple[str, str, int, int, int]]:
    """Every device's (ns, id, config_version, default-shadow version, ttl_s): one query (20,000 rows: tens of ms)."""
    return [(r[0], r[1], int(r[2]), int(r[3] or 0), int(r[4])) for r in conn.execute(versions_query())]


class ControlPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings)
        self.notifier: Notifier = make_notifier(settings.notifier, self.db.engine, settings.db_schema)
        self.versions = VersionCache()
        self.notifier.add_listener(self.versions.on_event)
        self.metrics = Metrics()
        from .auth import TokenCache
        self.tokens = TokenCache()
        self.metrics.token_verifications.set_function(lambda: self.tokens.verifications)
        from .liveness import Liveness
        self.liveness = Liveness(self)
        from .addrlimit import AddressLimiter
        #: registration challenges per client address (unauthenticated: each one costs a signed nonce)
        self.challenges = AddressLimiter(settings.challenges_per_address_per_s, settings.challenges_per_address_burst)
        from .telemetry import Telemetry
        self.telemetry = Telemetry(self)
        from .events import EventHub
        self.events = EventHub()  # the dashboard's live updates (events.py)
        self.notifier.add_listener(self.events.on_event)
        self.telemetry.listeners.append(self.events.on_telemetry)
        self.notifier.add_listener(lambda e: e["kind"] == "deleted" and self.telemetry.forget(e["ns"], e["dev"]))
        from .ota import assignments_changed
        # before the woken long-polls read (listeners run first): an assignment made by another process must not be
        # hidden by this one's "no assignments in this namespace" cache
        self.notifier.add_listener(lambda e: e["kind"] == "ota" and assignments_changed(self, e["ns"]))
        self.started_ms = 0
        #: cache entries (tokens + versions) when the heap was last frozen (app.refreeze_if_grown)
        self.frozen_entries = 0

    async def write(self, fn: Callable[..., T], *args: Any, retries: int = 3) -> T:
        """Run fn(conn, events, *args) in a transaction; deliver its events after commit.

        A unique-key race between two writers (two processes inserting the same row) or a transient lock error is
        retried: fn reads before it writes, so the retry sees the winner's row.
        """
        for attempt in range(retries):
            events = Events(self.notifier)
            try:
                result = await self.db.run(fn, events, *args)
            except (IntegrityError, OperationalError):
                if attempt == retries - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            self.notifier.deliver_all(events)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.db.run(fn, *args)

    async def warm_versions(self) -> int:
        """Fill the version cache from the database (start-up): the first heartbeats after a restart read no rows.

        An entry already there (an event that raced the load) wins only where its versions are newer."""
        rows = await self.read(load_all_versions)
        for ns, dev, cv, sv, ttl in rows:
            entry = self.versions.get(ns, dev)
            if entry is None:
                self.versions.put(ns, dev, cv, sv, ttl)
            else:
                entry.advance(cv, sv)
        return len(rows)

    async def versions_of(self, ns: str, dev: str) -> Versions | None:
        entry = self.versions.get(ns, dev)
        if entry is None:
            self.metrics.version_cache_misses.inc()
            loaded = await self.read(load_versions, ns, dev)
            if loaded is None:
                return None
            entry = self.versions.get(ns, dev) or self.versions.put(ns, dev, *loaded)
        return entry

    def base_url(self, request) -> str:
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")
