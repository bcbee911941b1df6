"""schemathesis's own CLI with its full default check set (response schemas, status codes, Allow headers, content
types, positive and negative data acceptance, stateful links) against the served OpenAPI document, on SQLite and
PostgreSQL: what the document says is what the server does (issue 17). Bounded: 8 deterministic examples per
operation in the examples, fuzzing and stateful phases (positive and negative data); `schemathesis.toml` beside this file lists the few semantic checks no schema can express."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cptest import LiveServer, drop_schema, make_settings, new_schema, require_pg

HERE = Path(__file__).resolve().parent
ST = Path(sys.executable).parent / "st"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_default_checks_pass_on_the_served_document(backend, tmp_path):
    if backend == "postgres":
        require_pg()
    schema = new_schema() if backend == "postgres" else None
    server = LiveServer(make_settings(backend, tmp_path, schema, max_config_wait_s=1, max_state_wait_s=1,
                                      max_heartbeat_wait_s=1))
    try:
        out = subprocess.run([str(ST), "--config-file", str(HERE / "schemathesis.toml"), "run",
                              f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {server.token('admin', '*', ttl=3600)}",
                              "-n", "8", "--generation-deterministic",
                              # the coverage phase enumerates every JsonObject level: minutes on a shared 2-core box
                              "--phases", "examples,fuzzing,stateful", "--request-timeout", "20", "--no-color"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        server.stop()
        if schema:
            drop_schema(schema)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
