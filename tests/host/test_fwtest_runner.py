"""`picoiot firmware test` (picoiot.fwtest): a module that times out counts as failed and leaves no temp directory."""
import tempfile

import pytest

from picoiot import fwtest
from picoiot.procs import micropython_available

pytestmark = pytest.mark.skipif(not micropython_available(), reason="needs the unix micropython and mpy-cross")


def test_a_timed_out_module_fails_and_its_temp_dir_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fwtest, "TIMEOUT_S", 0)  # no module finishes in time, however quick the interpreter and machine
    lines: list[str] = []
    passed, failed = fwtest.run_suite(pattern="test_fsutil", echo=lines.append)
    assert (passed, failed) == (0, 1) and "FAIL test_fsutil (timeout)" in lines, lines
    assert lines[0].startswith("interpreter: ") and "-bit" in lines[0]
    assert not list(tmp_path.glob("picoiot-fw-*"))
