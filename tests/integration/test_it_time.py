"""TimeSyncManager (firmware/iotlib/timesync.py) against the SNTP responder of `picoiot server --sntp-port`, under
CPython and the unix MicroPython."""
from ittest import run_scenario


def test_sntp_offset_from_the_control_plane(runtime, cli_server, operator, tmp_path):
    op = operator(cli_server)
    out = run_scenario(runtime, "time", op, tmp_path)
    assert abs(out["result"]["offset_ms"]) < 1000
