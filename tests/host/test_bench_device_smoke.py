"""The device speed benchmarks must keep running, or their figures silently stop meaning anything: each runs once with
tiny counts/durations against the real controllers under micropython (.mpy). No assertion on speed — only that every
answer was the expected one (the scripts exit non-zero otherwise) and that the figures are printed."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


def test_device_api_bench_runs():
    rc, out = _run("device_api.py", "--rounds", "1", "--requests", "40", "--seconds", "3", "--warmup", "5")
    assert rc == 0, out[-3000:]
    assert re.search(r"ratio /gpio ÷ hello per round: \d+\.\d\d", out), out[-3000:]
    assert re.search(r"ratio /gpio ÷ hello = \d+\.\d\d, median of 1 rounds \(target ≥ 0.7: (met|NOT met)\)", out), \
        out[-3000:]
    assert re.search(r"GET /gpio \(no token, 401\) +\d", out), out[-3000:]


def test_ws_stream_bench_runs():
    rc, out = _run("ws_stream.py", "--seconds", "1.5")
    assert rc == 0, out[-3000:]
    assert "latency method: ts vs host clock (same clock)" in out, out[-3000:]
    assert re.search(r"frames/s per client: \[[\d.]+, [\d.]+, [\d.]+\]", out), out[-3000:]
    assert re.search(r"p99 < 20 ms: (met|NOT met)", out), out[-3000:]


def test_ws_stream_latency_analysis_removes_a_clock_offset():
    # A device clock 5 s behind the host: the same-clock check must fail and the clock-free method take over.
    sys.path.insert(0, str(BENCH))
    import ws_stream
    frames = [[(1, 1000.0, 6002.0), (2, 1050.0, 6055.0)], [(1, 1000.0, 6003.0)]]
    r = ws_stream.analyse(frames, 1.0)
    assert r["method"].startswith("clock-free")
    assert r["p50_ms"] == 1.0 and r["max_ms"] == 3.0
    same = ws_stream.analyse([[(1, 1000.0, 1002.5), (3, 1100.0, 1101.0)]], 1.0)
    assert same["method"].startswith("ts vs host clock") and same["missed"] == [1]
