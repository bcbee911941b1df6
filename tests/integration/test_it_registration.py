"""AuthManager (firmware/iotlib/auth.py) against the real ServiceDiscovery of a `picoiot server` process, with key
files from `picoiot provision`, under CPython and the unix MicroPython."""
from ittest import run_scenario


def test_register_refuse_refresh_and_replay(runtime, cli_server, operator, tmp_path):
    op = operator(cli_server)
    out = run_scenario(runtime, "register", op, tmp_path)
    assert out["result"] == {"registrations": 3, "refreshes": 2}
