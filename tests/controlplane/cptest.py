"""Helpers for the control-plane tests: the control plane in the test's process (through ASGI, or under a real uvicorn
on 127.0.0.1 in a thread; conftest.py says which), on SQLite and on PostgreSQL.

Every test gets its own database: a fresh SQLite file, or a fresh PostgreSQL schema (unique per process and test,
dropped afterwards), so concurrent runs on one PostgreSQL never see each other's rows or notifications. The harness
itself is tests/support (shared with the device and integration tests and the benches); the names are kept here.
"""
from __future__ import annotations

from support import waits
from support.live import Device, InProcessServer, LiveServer, make_settings, sign  # noqa: F401
from support.pg import PG_URL, drop_schema, new_schema, pg_available, require_pg  # noqa: F401
from support.waits import metric  # noqa: F401


def wait_until(pred, timeout: float = 15.0, step: float = 0.01) -> None:
    """Poll a condition (a synchronisation aid, not a timing assertion); fails the test if it never holds."""
    waits.wait_until(pred, timeout, interval=step)
