"""The control plane of one process: the shared parts (plane.py) with the version cache, the token cache and the
collaborators that keep state in memory (liveness, telemetry, the dashboard's hub, the OTA offer cache)."""
from __future__ import annotations

import sqlalchemy as sa

from . import db as tables
from . import changes
from .addrlimit import AddressLimiter
from .auth import TokenCache
from .changes import Change
from .events import EventHub
from .liveness import Liveness
from .ota import assignments_changed
from .plane import Plane
from .settings import Settings
from .telemetry import Telemetry


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


class ControlPlane(Plane):
    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.versions = VersionCache()
        self.notifier.add_listener(self.versions.on_event)
        self.tokens = TokenCache()
        self.metrics.token_verifications.set_function(lambda: self.tokens.verifications)
        self.liveness = Liveness(self)
        #: registration challenges per client address (unauthenticated: each one costs a signed nonce)
        self.challenges = AddressLimiter(settings.challenges_per_address_per_s, settings.challenges_per_address_burst)
        self.telemetry = Telemetry(self)
        self.events = EventHub()  # the dashboard's live updates (events.py)
        self.notifier.add_listener(self.events.on_event)
        self.telemetry.listeners.append(self.events.on_telemetry)
        self.notifier.add_listener(lambda e: e["kind"] == "deleted" and self.telemetry.forget(e["ns"], e["dev"]))
        # before the woken long-polls read (listeners run first): an assignment made by another process must not be
        # hidden by this one's "no assignments in this namespace" cache
        self.notifier.add_listener(lambda e: e["kind"] == "ota" and assignments_changed(self, e["ns"]))
        #: cache entries (tokens + versions) when the heap was last frozen (app.refreeze_if_grown)
        self.frozen_entries = 0

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
