"""The control plane (`picoiot server` process) stopped and restarted under a running device: config, state, alarms
and heartbeat clients degrade and recover without losing anything, under CPython and the unix MicroPython."""
from ittest import run_scenario


def test_restart_mid_session_loses_nothing(runtime, cli_server, operator, tmp_path):
    op = operator(cli_server)
    try:
        out = run_scenario(runtime, "outage", op, tmp_path)
    finally:
        if cli_server.proc is None:  # leave the shared server running for the next test
            cli_server.start()
    assert out["result"] == {"missed_total": 1, "full_syncs": 2}
