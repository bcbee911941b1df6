"""Fixtures: the runtime the device code runs on, and the control plane (in-process uvicorn or the `picoiot server`
CLI as a subprocess) on SQLite or PostgreSQL."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ittest import CP_TESTS, Operator, ServerProcess, build_bundle  # noqa: E402

sys.path.insert(0, str(CP_TESTS))
from cptest import LiveServer, drop_schema, make_settings, new_schema, require_pg  # noqa: E402

@pytest.fixture(params=["cpython", "micropython"])
def runtime(request) -> str:
    if request.param == "micropython":
        build_bundle()
    return request.param


@pytest.fixture
def backend(request) -> str:
    """sqlite unless the test is parametrised with BOTH_BACKENDS."""
    name = getattr(request, "param", "sqlite")
    if name == "postgres":
        require_pg()
    return name


@pytest.fixture
def pg_schema(backend):
    schema = new_schema() if backend == "postgres" else None
    yield schema
    if schema:
        drop_schema(schema)


@pytest.fixture
def live_server(backend, pg_schema, tmp_path):
    """live_server(**settings) → a started in-process control plane (real uvicorn on 127.0.0.1)."""
    started = []

    def factory(**kw):
        s = LiveServer(make_settings(backend, tmp_path, pg_schema, **kw))
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def cli_server(tmp_path_factory):
    """One `picoiot server` subprocess (SQLite, SNTP responder) shared by the tests that need the CLI; a test may
    stop() and start() it (same ports, same data directory) but must leave it running."""
    s = ServerProcess(tmp_path_factory.mktemp("cp"), sntp=True).start()
    yield s
    s.close()


@pytest.fixture
def operator(request, runtime, tmp_path):
    """operator(server, **params) → the Operator answering the scenario's asks (device id unique per test)."""
    dev = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name.removeprefix("test_"))[-56:].strip("-")

    def make(server, **params):
        params.setdefault("device_id", dev)
        return Operator(server, tmp_path, runtime, **params)
    return make
