"""The control-plane benchmarks must keep running, or their figures silently stop meaning anything: each runs once
with tiny counts against the real control plane (and, for the flush, the real SQLite and PostgreSQL). No assertion on
speed — only that the scripts exit 0 (each checks its own answers / rows) and print their figures."""
import os
import re
import subprocess
import sys
from pathlib import Path

from cptest import PG_URL, require_pg

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script, *args):
    env = dict(os.environ, PICOIOT_BENCH_PG=PG_URL)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300,
                          env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_inprocess_bench_runs():
    rc, out = _run("cp_inprocess.py", "--devices", "80", "--register", "20", "--calls", "200", "--rounds", "1",
                   "--profile", "5")
    assert rc == 0, out[-3000:]
    assert re.search(r"heartbeat +\d+\.\d µs CPU per call", out) and "ratio /health ÷ heartbeat" in out, out[-3000:]


def test_flush_bench_writes_every_row_on_both_databases():
    require_pg()
    rc, out = _run("cp_flush.py", "--rows", "300", "--rounds", "2", "--db", "both")
    assert rc == 0, out[-3000:]
    for db in ("sqlite", "postgres"):
        assert f"{db}: 300 rows" in out, out[-3000:]
    assert len(re.findall(r"(before|now) +flush thread CPU +\d+\.\d ms", out)) == 4, out[-3000:]


def test_load_bench_runs_with_alternating_capacity_rounds():
    rc, out = _run("controlplane_load.py", "--devices", "40", "--interval", "2", "--duration", "2", "--db", "sqlite",
                   "--capacity-rounds", "2", "--capacity-duration", "0.5", "--concurrency", "4")
    assert rc == 0, out[-3000:]
    assert len(re.findall(r"round \d: /health \d+/s", out)) == 2, out[-3000:]
    assert re.search(r"heartbeat / no-op capacity ratio: \d\.\d\d \(median of rounds: [\d., ]+\); by server CPU", out), \
        out[-3000:]
    assert re.search(r"sqlite +40 +\d+", out), out[-3000:]


def test_fleet_scenario_runs_long_polls_wakes_and_the_storm():
    require_pg()
    rc, out = _run("controlplane_load.py", "--scenario", "fleet", "--devices", "40", "--interval", "2",
                   "--duration", "3", "--client-procs", "2", "--fleet-writes", "5", "--storm-spread", "1",
                   "--storm-limit", "60", "--register-concurrency", "8")
    assert rc == 0, out[-3000:]
    assert re.search(r"held polls: \d+ heartbeats/s \(offered 20/s\)", out), out[-3000:]
    m = re.search(r"operator writes on the other process: (\d+) \(0 refused\), woken (\d+), not woken in the window "
                  r"(\d+): p50 [\d.]+ ms", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out[-3000:]
    assert re.search(r"re-registration storm .*: 40/40 registered, all within [\d.]+ s", out), out[-3000:]
    assert "503 without Retry-After: 0" in out, out[-3000:]


def test_storm_scenario_restarts_and_every_device_registers_again():
    require_pg()
    rc, out = _run("controlplane_load.py", "--scenario", "storm", "--devices", "30", "--client-procs", "1",
                   "--storm-spread", "1", "--storm-limit", "60", "--storm-rounds", "2", "--register-concurrency", "8")
    assert rc == 0, out[-3000:]
    assert len(re.findall(r"re-registration storm .*: 30/30 registered, all within [\d.]+ s", out)) == 2, out[-3000:]
    assert re.search(r"per registration: server [\d.]+ ms", out) and "503 without Retry-After: 0" in out, out[-3000:]


def test_cloud_to_relay_bench_runs():
    # real micropython devices: the bench rotted once already (a simulator module moved) with nothing to notice it
    rc, out = _run("cloud_to_relay.py", "--devices", "2", "--rounds", "1", "--trials", "2", "--baseline-trials", "0")
    assert rc == 0, out[-3000:]
    assert re.search(r"one device, long-poll +2 ", out) and re.search(r"2 devices at once, long-poll +2 ", out), \
        out[-3000:]
    assert re.search(r"per write, the devices' interpreters used [\d.]+ ms CPU and the server [\d.]+ ms", out), \
        out[-3000:]
