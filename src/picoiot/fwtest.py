"""`picoiot firmware test`: the dual-runtime firmware suite under the unix micropython with a Pico-sized heap."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import build, paths

#: seconds one test module may run under micropython before it counts as failed
TIMEOUT_S = 600


def run_suite(heap: str = "192K", pattern: str = "test_", verbose: bool = False, echo=print,
              micropython: str | None = None) -> tuple[int, int]:
    """Every tests/firmware module (name starting with `pattern`) in its own interpreter at `heap`; (passed, failed).
    micropython: the interpreter to run (default: $PICOIOT_MICROPYTHON or the pinned one); its version and word size
    are printed first."""
    paths.use_micropython(micropython)
    echo(f"interpreter: {paths.micropython_info()}, heap {heap}")
    out = paths.REPO / "build" / "fwtest"
    build.build_firmware(out)
    build.compile_tree(paths.FW_TESTS, out, [p for p in sorted(paths.FW_TESTS.glob("*.py")) if p.name != "conftest.py"])
    modules = sorted(p.stem for p in paths.FW_TESTS.glob("test_*.py") if p.stem.startswith(pattern))
    passed = failed = 0
    for mod in modules:
        tmp = tempfile.mkdtemp(prefix="picoiot-fw-")
        env = dict(os.environ, MICROPYPATH=f"{out}:.frozen", PICOIOT_FWTEST_TMP=tmp)
        try:
            proc = subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap}", "-m", "fwrunner", mod],
                                  capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired:
            echo(f"FAIL {mod} (timeout)")
            failed += 1
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                _, p, f = line.split()
                result = (int(p), int(f))
        if result is None:
            echo(f"FAIL {mod}: runner crashed (exit {proc.returncode})\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            failed += 1
            continue
        passed += result[0]
        failed += result[1]
        if result[1] or verbose:
            echo("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT ")))
            if proc.stderr:
                echo(proc.stderr[-3000:])
        else:
            echo(f"{mod}: {result[0]} passed")
    return passed, failed
