"""StateManager (firmware/iotlib/state.py) against the real StateServer, on SQLite and PostgreSQL (LISTEN/NOTIFY wakes
the blocking query), under CPython and the unix MicroPython."""
from ittest import BOTH_BACKENDS, run_scenario


@BOTH_BACKENDS
def test_shadow_sync_conflict_and_blocking_query(runtime, backend, live_server, operator, tmp_path):
    op = operator(live_server())
    out = run_scenario(runtime, "state", op, tmp_path)
    assert out["result"]["conflicts"] == 1 and out["result"]["full_syncs"] == 1
