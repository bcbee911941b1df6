"""`picoiot firmware build` makes the bundle that goes onto a board: the simulated board (picosim) and its launchers are
test equipment and stay out, and so does microdot, which the firmware never imports (iotlib.web is its own server)."""
from pathlib import Path

import pytest

from picoiot.procs import micropython_available

pytestmark = pytest.mark.skipif(not micropython_available(), reason="needs mpy-cross")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.mpy") if not any(
        part.startswith(".") for part in p.relative_to(root).parts)}


def test_board_bundle_holds_no_simulator_and_no_microdot(tmp_path):
    from typer.testing import CliRunner

    from picoiot import build
    from picoiot.cli import app
    out = tmp_path / "board"
    sim = tmp_path / "sim"
    build.build_firmware(out, with_microdot=True)  # a simulation build first in the same place: the board build must
    # clean it
    r = CliRunner().invoke(app, ["firmware", "build", "--out", str(out)])
    assert r.exit_code == 0, r.output
    files = _files(out)
    assert "iotlib/hal.mpy" in files and "relays_controller.mpy" in files
    assert not [f for f in files if f.startswith("picosim/") or f in ("main_sim.mpy", "boot_romfs.mpy")], files
    assert not [f for f in files if f.startswith("microdot/")], files
    # the simulation build has the simulator, and nothing of the firmware imports microdot
    build.build_firmware(sim)
    assert {"picosim/__init__.mpy", "picosim/base.mpy", "main_sim.mpy"} <= _files(sim)
    import re
    imports = [ln for p in build.paths.FIRMWARE.rglob("*.py") for ln in p.read_text().splitlines()
               if re.match(r"\s*(from|import)\s+microdot\b", ln)]
    assert not imports, imports
