"""The firmware memory benchmark's workload must keep working, or its figure silently means nothing: one run of
bench/mp_iotlib_all.py under the real MicroPython unix port from .mpy (no bisection), and one under CPython.

The run's heap is a fixed margin above the workload's 64-bit minimum (192–200K on 2026-12-03: 192K failed 1 run in 6),
so this checks that the workload runs, not a budget: the figure is the bench's (docs/benchmarks.md), the budget
guards are tests/host/test_device_memory_smoke.py."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import heaplib  # noqa: E402


def _passed(proc):
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "\nOK max_stall_ms=" in "\n" + proc.stdout and "MemoryError" not in out


#: K, see the module's docstring
WORKLOAD_HEAP_K = 224


def test_iotlib_workload_completes_under_micropython():
    heaplib.bundle()
    heaplib.compile_script(BENCH / "mp_iotlib_all.py")
    proc = heaplib.run_module("mp_iotlib_all", WORKLOAD_HEAP_K, timeout=120)
    assert _passed(proc), proc.stdout[-1500:] + proc.stderr[-1500:]


def test_iotlib_workload_fails_loudly_when_the_heap_is_too_small():
    # The harness' bisection relies on a failed run being seen as one (not a hang, not a false OK).
    heaplib.bundle()
    heaplib.compile_script(BENCH / "mp_iotlib_all.py")
    proc = heaplib.run_module("mp_iotlib_all", 64, timeout=120)
    assert not _passed(proc)
    assert "MemoryError" in proc.stdout + proc.stderr


def test_iotlib_workload_completes_under_cpython(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(heaplib.REPO / "firmware"), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH / "mp_iotlib_all.py")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert _passed(proc), proc.stdout[-1500:] + proc.stderr[-1500:]
    assert list(tmp_path.iterdir()) == []  # the simulated flash directory is removed afterwards
