"""schemathesis against the OpenAPI document served by a real control plane (uvicorn on 127.0.0.1), SQLite and
PostgreSQL: generated requests to every operation must never get a 5xx, and every 4xx must be the JSON error body of
docs/protocol.md (`{"error": "..."}`).

Three passes per backend, 20 examples per operation each: an admin token with everything generated (mostly unknown
namespaces and devices), an admin token aimed at a namespace and device that exist (so writes reach the database),
and the device's own token on the device-facing operations. Long-poll waits are capped at 1 s on this server so a
generated `wait` cannot stall the run.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from cptest import LiveServer, drop_schema, make_settings, new_schema, require_pg

DEVICE = "sch-dev-1"
NAMESPACE = "default"
EXAMPLES = settings(max_examples=20, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _start(backend: str, tmp_path_factory) -> tuple[LiveServer, str | None]:
    if backend == "postgres":
        require_pg()
    schema = new_schema() if backend == "postgres" else None
    server = LiveServer(make_settings(backend, tmp_path_factory.mktemp(f"st-{backend}"), schema,
                                      max_config_wait_s=1, max_state_wait_s=1, max_heartbeat_wait_s=1))
    dev = server.register(DEVICE, "relays")
    r = server.client.post(f"/api/v1/namespaces/{NAMESPACE}/devices/{DEVICE}/shadows/default",
                           json={"state": {"reported": {"relay1": "off"}}}, headers=dev.headers)
    assert r.status_code == 200, r.text
    server.device_headers = dev.headers  # type: ignore[attr-defined]
    return server, schema


@pytest.fixture(scope="module")
def live_sqlite(tmp_path_factory):
    server, _ = _start("sqlite", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_postgres(tmp_path_factory):
    server, schema = _start("postgres", tmp_path_factory)
    yield server
    server.stop()
    drop_schema(schema)


def run_pass(server: LiveServer, headers: dict, known: bool, only=None) -> int:
    """Every operation of the served OpenAPI document, 20 generated examples each; all failures reported together."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if only is not None and not only(op.path):
            continue
        operations += 1

        @EXAMPLES
        @given(case=op.as_strategy())
        def examples(case):
            check(case, server, headers, known)

        try:
            examples()
        except Exception as e:  # collect, so one run lists every operation that misbehaves
            failures.append(f"{op.method.upper()} {op.path}: {str(e)[:1500]}")
    assert not failures, f"{len(failures)} operation(s) failed:\n\n" + "\n\n".join(failures)
    return operations


def check(case, server: LiveServer, headers: dict, known: bool) -> None:
    if known:
        for name, value in (("ns", NAMESPACE), ("device_id", DEVICE)):
            if name in (case.path_parameters or {}):
                case.path_parameters[name] = value
    response = case.call(base_url=server.url, headers=headers, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (
            f"{case.method} {case.formatted_path} -> {response.status_code} without a JSON error body: "
            f"{response.text[:200]!r}\n{case.as_curl_command()}")


def _device_facing(path: str) -> bool:
    return path.startswith(("/api/v1/devices/", "/api/devices/")) or "/shadows" in path


def test_sqlite_admin_fuzz(live_sqlite):
    assert run_pass(live_sqlite, live_sqlite.auth("admin"), known=False) > 20


def test_sqlite_admin_on_a_known_device(live_sqlite):
    assert run_pass(live_sqlite, live_sqlite.auth("admin"), known=True) > 20


def test_sqlite_device_token(live_sqlite):
    assert run_pass(live_sqlite, live_sqlite.device_headers, known=True, only=_device_facing) >= 5


@pytest.mark.postgres
def test_postgres_admin_fuzz(live_postgres):
    assert run_pass(live_postgres, live_postgres.auth("admin"), known=False) > 20


@pytest.mark.postgres
def test_postgres_admin_on_a_known_device(live_postgres):
    assert run_pass(live_postgres, live_postgres.auth("admin"), known=True) > 20


@pytest.mark.postgres
def test_postgres_device_token(live_postgres):
    assert run_pass(live_postgres, live_postgres.device_headers, known=True, only=_device_facing) >= 5
