"""Change events: what a committed write tells the rest of the control plane, one constructor per kind.

An event is a plain dict — `{"ns", "dev", "kind", …}` — because it crosses processes as JSON (PostgreSQL NOTIFY,
notifier.py) and the dashboard forwards a few of its fields (events.py); the constructors here are the only places
that build one, so its fields per kind are written down once:

| kind | fields | made by | read by |
|---|---|---|---|
| `config` | version | a new effective config | version cache, long-polls, dashboard |
| `state` | name, version | a shadow update | version cache (shadow `default`), long-polls, dashboard |
| `device` | — | a device provisioned | dashboard |
| `device` | ttl, config_version, state_version | a registration | version cache (warms it), liveness, dashboard |
| `online` / `offline` | — | liveness | liveness, dashboard |
| `deleted` | — | a device deleted | every cache of the device |
| `ota` | — | an OTA assignment or rollout offer | OTA assignment cache, held heartbeats |
| `alarm` | — | alarm ingestion or ack (this process only) | dashboard |
| `resync` | (no ns/dev) | the notifier, when events may have been missed | every cache (drop), every waiter |

`Events` collects the changes of one write transaction (plane.Plane.write delivers them after commit).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import sqlalchemy as sa

Change = dict[str, Any]


class Notifies(Protocol):
    """What `Events` needs of a notifier (notifier.Notifier, which builds `resync` here: this module does not
    import it back)."""

    def sql_notify(self, conn: "sa.Connection", event: Change) -> None: ...


def config(ns: str, dev: str, version: int) -> Change:
    return {"ns": ns, "dev": dev, "kind": "config", "version": version}


def state(ns: str, dev: str, name: str, version: int) -> Change:
    return {"ns": ns, "dev": dev, "kind": "state", "name": name, "version": version}


def provisioned(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "device"}


def registered(ns: str, dev: str, ttl: int, config_version: int, state_version: int) -> Change:
    """The versions ride on the event, so every process's version cache holds the device before its first
    heartbeat."""
    return {"ns": ns, "dev": dev, "kind": "device", "ttl": ttl, "config_version": config_version,
            "state_version": state_version}


def is_registration(e: Change) -> bool:
    return e["kind"] == "device" and "config_version" in e


def online(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "online"}


def offline(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "offline"}


def deleted(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "deleted"}


def ota(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "ota"}


def alarm(ns: str, dev: str) -> Change:
    return {"ns": ns, "dev": dev, "kind": "alarm"}


def resync() -> Change:
    return {"kind": "resync"}


class Events(list):
    """The changes one write transaction makes: `emit` for a change every process must hear of (NOTIFY on
    PostgreSQL now, local wake-up after commit), `local` for one only this process's live views need."""

    def __init__(self, notifier: Notifies) -> None:
        super().__init__()
        self.notifier = notifier

    def emit(self, conn: "sa.Connection", event: Change) -> None:
        self.notifier.sql_notify(conn, event)
        self.append(event)

    def local(self, event: Change) -> None:
        self.append(event)
