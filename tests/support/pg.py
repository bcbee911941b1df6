"""The PostgreSQL server the suite uses: `PICOIOT_TEST_PG` (default: database `test` at 127.0.0.1:5432, trust auth).

Every user gets a schema of its own, unique per process (so per xdist worker) and per call, dropped afterwards:
concurrent tests and concurrent runs on one server never see each other's rows or notifications."""
from __future__ import annotations

import itertools
import os
import socket
import uuid

import sqlalchemy as sa

PG_URL = os.environ.get("PICOIOT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_counter = itertools.count()
_pg_ok: bool | None = None


def _engine(url: str = PG_URL) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def pg_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            with socket.create_connection(("127.0.0.1", 5432), timeout=1):
                pass
            eng = _engine()
            with eng.connect() as c:
                c.exec_driver_sql("SELECT 1")
            eng.dispose()
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


def new_schema(prefix: str = "cp") -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


def drop_schema(schema: str, url: str = PG_URL) -> None:
    eng = _engine(url)
    with eng.begin() as c:
        c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    eng.dispose()


def require_pg() -> None:
    """Skip without PostgreSQL, or fail under PICOIOT_REQUIRE_ALL=1 (CI: nothing may be skipped)."""
    import pytest  # here: the benches use this module without pytest
    if not pg_available():
        if os.environ.get("PICOIOT_REQUIRE_ALL"):
            pytest.fail(f"PostgreSQL not reachable at {PG_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
