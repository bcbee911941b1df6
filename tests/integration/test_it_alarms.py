"""AlarmManager (firmware/iotlib/alarms.py) against the real alarm ingestion, through a proxy that loses an answer,
under CPython and the unix MicroPython."""
from ittest import run_scenario


def test_flush_dedup_and_idempotent_retry(runtime, live_server, operator, tmp_path):
    op = operator(live_server())
    out = run_scenario(runtime, "alarms", op, tmp_path)
    assert out["result"]["sent"] == 6  # 2 + 1 (the retry; the lost answer does not count) + 1 + 1 + 1
