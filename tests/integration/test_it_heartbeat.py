"""Heartbeats from WatchdogManager (firmware/iotlib/watchdog.py) against the real heartbeat endpoint and liveness
sweep, under CPython and the unix MicroPython."""
from ittest import BOTH_BACKENDS, run_scenario


@BOTH_BACKENDS
def test_pending_versions_and_longpoll(runtime, backend, live_server, operator, tmp_path):
    op = operator(live_server())
    out = run_scenario(runtime, "heartbeat", op, tmp_path)
    assert out["result"] == {"acks": 4, "missed": 0}


def test_silent_device_goes_offline_and_comes_back(runtime, live_server, operator, tmp_path):
    # TTL = heartbeat interval (1 s) x 1 + 1 s: a short TTL so the sweep acts within the test
    op = operator(live_server(ttl_missed=1, ttl_slack_s=1))
    out = run_scenario(runtime, "offline", op, tmp_path)
    assert out["result"] == {"ttl": 2, "acks": 2}
