"""schemathesis's own CLI (`st run`) with its full default check set, as both API suites run it
(tests/controlplane/test_schemathesis.py, tests/devices/test_schemathesis_device.py): bounded and deterministic, so a
run is the same cases every time and its length is set by the example count."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ST = Path(sys.executable).parent / "st"


def run_st(location: str, config: Path, token: str, *args: str, examples: int, cwd: Path) -> str:
    """`st run` on location with a bearer token; fails the test with schemathesis's report unless every check passed.
    Returns the report (its summary counts the cases)."""
    out = subprocess.run([str(ST), "--config-file", str(config), "run", location, "-H", f"Authorization: Bearer {token}",
                          "-n", str(examples), "--generation-deterministic", "--request-timeout", "20", "--no-color",
                          *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    cases = re.search(r"\d+ generated[^\n]*", out.stdout)
    print(f"schemathesis on {location}: {cases.group(0) if cases else '?'}")  # (pytest -s shows the case count)
    return out.stdout
