"""bench/rollout.py must keep running (its figures mean nothing otherwise): once with tiny counts against a real
`picoiot server`. No assertion on speed — only that it exits 0 (it checks its own rollout and alarms) and prints its
figures beside their baselines."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_rollout_bench_runs():
    proc = subprocess.run([sys.executable, str(BENCH / "rollout.py"), "--devices", "8", "--soak", "0.2",
                           "--alarms", "5", "--alarm-gap", "0.05"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"rollout: +\d+\.\d s, server CPU \d\.\d\d of a core", out), out[-3000:]
    assert re.search(r"baseline: +\d+\.\d s, server CPU", out), out[-3000:]
    assert re.search(r"5 alarms .*: p50 \d.* ms, p99 \d.* ms", out), out[-3000:]
    assert "baseline direct POST to the receiver: p50" in out, out[-3000:]
