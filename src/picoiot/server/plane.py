"""The control plane's shared parts that every feature needs: settings, database, notifier, metrics, and the write
helper. `core.ControlPlane` adds the caches and the collaborators it creates (liveness, telemetry, the OTA offer
cache's listener, the dashboard's hub); those take a `Plane`, not a ControlPlane, because core imports them and they
must not import core back, not even for a type (tests/controlplane/test_import_graph.py)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

from sqlalchemy.exc import IntegrityError, OperationalError

from .changes import Events
from .db import Database
from .metrics import Metrics
from .notifier import Notifier, make_notifier
from .settings import Settings

T = TypeVar("T")


class Plane:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings)
        self.notifier: Notifier = make_notifier(settings.notifier, self.db.engine, settings.db_schema)
        self.metrics = Metrics()
        #: when this process began serving (ms since the epoch; set by the app's start-up)
        self.started_ms = 0

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
