"""Fixtures: the control plane served by a real uvicorn on 127.0.0.1, parametrised over SQLite and PostgreSQL."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/stcli.py
from cptest import LiveServer, drop_schema, make_settings, new_schema, require_pg  # noqa: E402


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request) -> str:
    if request.param == "postgres":
        require_pg()
    return request.param


def _factory(backend, tmp_path):
    started: list[LiveServer] = []
    schema = new_schema() if backend == "postgres" else None

    def factory(**kw) -> LiveServer:
        s = LiveServer(make_settings(backend, tmp_path, schema, **kw))
        started.append(s)
        return s

    factory.backend = backend
    factory.schema = schema
    yield factory
    for s in started:
        s.stop()
    if schema:
        drop_schema(schema)
    for s in started:  # a failing sweeper would make liveness tests pass for the wrong reason
        if not getattr(s, "database_broken_on_purpose", False):
            assert s.cp.metrics.housekeeping_errors._value.get() == 0, "housekeeping failed during the test"


@pytest.fixture
def server_factory(backend, tmp_path):
    """server_factory(**settings) → a started LiveServer; several calls share one database (same schema/file)."""
    yield from _factory(backend, tmp_path)


@pytest.fixture
def pg_server_factory(tmp_path):
    """server_factory on PostgreSQL only (what needs LISTEN/NOTIFY between servers)."""
    require_pg()
    yield from _factory("postgres", tmp_path)


@pytest.fixture
def server(server_factory) -> LiveServer:
    return server_factory()
