"""schemathesis's own CLI with its full default check set (response schemas, status codes, Allow headers, content
types, positive and negative data acceptance, ignored auth, stateful links, ...) against the OpenAPI document served by
a real control plane (uvicorn on 127.0.0.1), SQLite and PostgreSQL: what the document says is what the server does
(issue 17), and nothing generated gets a 5xx. Every error is the documented `ErrorBody`, so the response-schema check
holds every 4xx to `{"error": ...}` too.

Three runs per backend, 8 deterministic examples per operation in the examples, fuzzing and stateful phases:
- an admin token with everything generated (mostly unknown namespaces and devices);
- the device's own token on the device-facing operations, aimed at its namespace and id;
- an admin token aimed at a namespace and device that exist, so that writes reach the database (last: it may delete
  the device). Examples and fuzzing only: with every {device_id} pinned, a stateful scenario's "created" device is
  looked up under the pinned id instead.
Long-poll waits are capped at 1 s on this server so a generated `wait` cannot stall a run. `schemathesis.toml` beside
this file lists the few semantic checks no schema can express.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cptest import LiveServer, drop_schema, make_settings, new_schema, require_pg
from stcli import run_st

DEVICE = "sch-dev-1"
NAMESPACE = "default"
CONFIG = (Path(__file__).resolve().parent / "schemathesis.toml").read_text()
EXAMPLES = 8


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
    server.device_token = dev.token  # type: ignore[attr-defined]
    return server, schema


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request, tmp_path_factory):
    server, schema = _start(request.param, tmp_path_factory)
    yield server
    server.stop()
    if schema:
        drop_schema(schema)


def _run(server: LiveServer, token: str, tmp_path, *args: str, known: bool = False,
         phases: str = "examples,fuzzing,stateful") -> None:
    config = tmp_path / "schemathesis.toml"
    # top-level parameters pin every operation's {ns} and {device_id} to ones that exist
    pinned = f'parameters = {{ ns = "{NAMESPACE}", device_id = "{DEVICE}" }}\n' if known else ""
    config.write_text(pinned + CONFIG)
    # (no coverage phase: it enumerates every JsonObject level, minutes per run on a shared 2-core box)
    run_st(f"{server.url}/openapi.json", config, token, "--phases", phases, *args, examples=EXAMPLES, cwd=tmp_path)


def test_everything_generated(live, tmp_path):
    _run(live, live.token("admin", ttl=3600), tmp_path)


def test_the_devices_own_token_on_its_operations(live, tmp_path):
    _run(live, live.device_token, tmp_path, "--include-path-regex", r"^/api(/v1)?/devices/|/shadows", known=True)


def test_an_admin_on_a_known_device(live, tmp_path):
    _run(live, live.token("admin", ttl=3600), tmp_path, known=True, phases="examples,fuzzing")
