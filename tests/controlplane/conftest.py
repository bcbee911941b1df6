"""Fixtures: the control plane, parametrised over SQLite and PostgreSQL.

`server`/`server_factory` run the app in the test's process through ASGI (support.live.InProcessServer): no socket,
and its lifespan (migration, LISTEN/NOTIFY, sweepers) and middlewares (admission, the hot path) as under uvicorn.
Outgoing calls are real: a webhook receiver is an HTTP server on 127.0.0.1 either way. A test marked `real_server`
gets the same app under a real uvicorn on 127.0.0.1 (LiveServer) instead, because something other than
`server.client` reaches the server's URL: `ota_cli` or the `picoiot` CLI, clients of their own holding connections or
with their own timeouts (admission limits, a stalled receiver), or the hot path's tests (test_hotpath.py), which are
about requests as a server hands them over. Tests that start `picoiot server` as a process (test_cli.py,
test_multiprocess_pg.py, ...) and the schemathesis suite (its CLI is a subprocess) do not use these fixtures."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/stcli.py
from cptest import InProcessServer, LiveServer, drop_schema, make_settings, new_schema, require_pg  # noqa: E402


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request) -> str:
    if request.param == "postgres":
        require_pg()
    return request.param


def _factory(backend, tmp_path, request):
    kind = LiveServer if request.node.get_closest_marker("real_server") else InProcessServer
    started: list[LiveServer | InProcessServer] = []
    schema = new_schema() if backend == "postgres" else None

    def factory(**kw) -> LiveServer | InProcessServer:
        s = kind(make_settings(backend, tmp_path, schema, **kw))
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
def server_factory(backend, tmp_path, request):
    """server_factory(**settings) → a started server; several calls share one database (same schema/file)."""
    yield from _factory(backend, tmp_path, request)


@pytest.fixture
def pg_server_factory(tmp_path, request):
    """server_factory on PostgreSQL only (what needs LISTEN/NOTIFY between servers)."""
    require_pg()
    yield from _factory("postgres", tmp_path, request)


@pytest.fixture
def server(server_factory) -> LiveServer | InProcessServer:
    return server_factory()
