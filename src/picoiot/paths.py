"""Where things are: the repository's firmware tree, the bundled micropython and mpy-cross binaries."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
FW_TESTS = REPO / "tests" / "firmware"


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: run ./dev setup")
    return found


def micropython_bin() -> str:
    return os.environ.get("PICOIOT_MICROPYTHON") or _bin("micropython")


def mpy_cross_bin() -> str:
    return _bin("mpy-cross")


def microdot_dir() -> Path:
    import microdot
    return Path(microdot.__file__).parent
