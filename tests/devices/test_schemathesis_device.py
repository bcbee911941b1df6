"""schemathesis's own CLI with its full default check set (status codes, content types, response schemas and headers,
Allow on undeclared methods, positive and negative data acceptance, ignored auth, ...) against docs/device-api.yaml on
real simulated devices (unix micropython from .mpy, registered with a real control plane): what the document says is
what the device does. Paths go to the device that serves them (/gpio* → relays, /sensors and /ws → sensors, the
common ones to both); `schemathesis.toml` beside this file lists what no schema can say. POST /reboot is left out:
it resets the device, by design (tests/devices/test_resets.py). Afterwards the device still serves, never restarted,
and never ran out of heap (device_factory fails the module on a MemoryError in a device's log)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from picoiot import paths
from stcli import run_st

HERE = Path(__file__).resolve().parent
SPEC = paths.REPO / "docs" / "device-api.yaml"
OTHERS = {"relays": "^/(sensors|ws)$", "sensors": "^/gpio"}  # the paths only the other kind serves
#: examples per operation in each phase (examples, coverage, fuzzing): ≈ 40 s per device on a loaded 2-core box
EXAMPLES = 25


@pytest.mark.parametrize("kind", ["relays", "sensors"])
def test_device_api_conforms_to_its_document(device_factory, kind, tmp_path):
    dev = device_factory(kind)
    report = run_st(str(SPEC), HERE / "schemathesis.toml", dev.token("admin"), "--url", dev.url,
                    "--exclude-path-regex", OTHERS[kind], "--exclude-path", "/reboot", examples=EXAMPLES, cwd=tmp_path)
    cases = re.search(r"(\d+) generated", report)
    assert cases and int(cases.group(1)) >= 50, report[-3000:]  # the operations were reached, not filtered out
    assert dev.get("/health", role=None).status_code == 200
    assert dev.child.running() and dev.child.restarts == 0
