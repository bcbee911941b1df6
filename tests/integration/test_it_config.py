"""ConfigManager (firmware/iotlib/config.py) against the real ConfigurationServer, on SQLite and PostgreSQL, under
CPython and the unix MicroPython."""
from ittest import BOTH_BACKENDS, run_scenario


@BOTH_BACKENDS
def test_fetch_longpoll_apply_and_reject(runtime, backend, live_server, operator, tmp_path):
    op = operator(live_server())
    out = run_scenario(runtime, "config", op, tmp_path)
    assert out["result"]["failures"] == 3  # the Wi-Fi pin, the unknown relay field, two relays on one pin


def test_blocking_query_outlasts_the_client_default_timeout(runtime, live_server, operator, tmp_path):
    op = operator(live_server())
    out = run_scenario(runtime, "config_wait", op, tmp_path)
    assert out["result"]["version"] == 1


def test_operator_removes_a_relay(runtime, live_server, operator, tmp_path):
    op = operator(live_server())
    run_scenario(runtime, "config_remove", op, tmp_path)
