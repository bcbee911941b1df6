"""Change notifications that wake long-polls: in-process, or across processes through PostgreSQL LISTEN/NOTIFY.

An event is a small dict built by `changes.py` (which lists every kind and its fields).
Writers call `sql_notify(conn, event)` inside their transaction (PostgreSQL delivers it to every listening process on
commit) and `deliver(event)` once committed (wakes this process at once). Waiters subscribe to a device's topic
*before* reading the current version, so no change can slip between the read and the wait.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from typing import Any, Callable

import sqlalchemy as sa

from . import changes

log = logging.getLogger("picoiot.server.notifier")


def topic(ns: str, device_id: str) -> str:
    return f"{ns}/{device_id}"


class Subscription:
    def __init__(self, notifier: "Notifier", key: str):
        self._notifier = notifier
        self.key = key
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """True if woken by an event, False on timeout."""
        if timeout <= 0:
            return self.event.is_set()
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self._notifier._unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Notifier:
    """In-process notifier (one server process, or SQLite)."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def add_listener(self, fn: Callable[[dict], None]) -> None:
        self._listeners.append(fn)

    def subscribe(self, key: str) -> Subscription:
        sub = Subscription(self, key)
        self._subs.setdefault(key, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]

    def deliver(self, event: dict) -> None:
        """Must run on the event loop's thread."""
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:  # pragma: no cover - a listener bug must not stop the wake-ups
                log.exception("notifier listener failed")
        for sub in list(self._subs.get(topic(event["ns"], event["dev"]), ())):
            sub.event.set()

    def drain(self) -> None:
        """Shutting down: every long-poll answers now with what it has, and new ones do not wait (the device polls
        again, on another replica behind the load balancer, instead of being cut off at the end of the grace time)."""
        self.draining = True
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.event.set()

    def resync(self) -> None:
        """Events may have been missed (a lost LISTEN connection): listeners drop their caches, every waiter re-reads."""
        for fn in self._listeners:
            try:
                fn(changes.resync())
            except Exception:  # pragma: no cover
                log.exception("notifier listener failed")
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.event.set()

    def deliver_all(self, events: list[dict]) -> None:
        for e in events:
            self.deliver(e)

    def sql_notify(self, conn: sa.Connection, event: dict) -> None:
        """Called inside the writer's transaction; only cross-process notifiers do anything here."""

    def notify_column(self, event: dict) -> sa.ColumnElement | None:
        """`sql_notify` as a column for a statement the writer runs anyway (`… RETURNING <it>`): one round trip less
        (registration, discovery.py). None where there is nothing to send."""
        return None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        pass


class PostgresNotifier(Notifier):
    """LISTEN/NOTIFY on one channel per schema, so test runs in separate schemas never wake each other."""

    #: seconds between reconnect attempts of the LISTEN connection
    reconnect_s = 1.0

    def __init__(self, engine: sa.Engine, schema: str | None = None):
        super().__init__()
        self.channel = "picoiot" + ("_" + re.sub(r"[^a-z0-9_]", "_", schema.lower()) if schema else "")
        self.channel = self.channel[:63]
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def sql_notify(self, conn: sa.Connection, event: dict) -> None:
        conn.execute(sa.select(self.notify_column(event)))

    def notify_column(self, event: dict) -> sa.ColumnElement:
        return sa.func.pg_notify(self.channel, json.dumps(event, separators=(",", ":")))

    async def start(self) -> None:
        await super().start()
        self._thread = threading.Thread(target=self._listen, name="picoiot-pg-listen", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, 10.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._wake_and_join)

    def _wake_and_join(self) -> None:
        import psycopg
        try:  # an empty notification ends the listener's wait at once instead of at its next timeout
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, '')", (self.channel,))
        except Exception:
            pass
        assert self._thread is not None
        self._thread.join(5.0)

    def _listen(self) -> None:
        import psycopg
        connected_before = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self._ready.set()
                    if connected_before and self.loop is not None and not self.loop.is_closed():
                        self.loop.call_soon_threadsafe(self.resync)
                    connected_before = True
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=1.0):
                            if self._stop.is_set():
                                break
                            self._received(n.payload)
            except Exception as e:  # connection lost: long-polls still time out and re-read, so only latency suffers
                log.warning("LISTEN connection failed (%s); retrying", type(e).__name__)
                self._ready.set()
                self._stop.wait(self.reconnect_s)

    def _received(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict) or "ns" not in event or "dev" not in event or "kind" not in event:
            return
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.deliver, event)


def make_notifier(kind: str, engine: sa.Engine, schema: str | None) -> Notifier:
    if kind == "postgres" or (kind == "auto" and engine.dialect.name == "postgresql"):
        return PostgresNotifier(engine, schema)
    return Notifier()
