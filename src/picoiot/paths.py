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
    """The unix micropython to run: $PICOIOT_MICROPYTHON (set by the --micropython options), else the pinned one."""
    return os.environ.get("PICOIOT_MICROPYTHON") or _bin("micropython")


def use_micropython(path: str | None) -> None:
    """A --micropython PATH option: this process and every child it starts run that interpreter."""
    if path:
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"--micropython {path}: not an executable file")
        os.environ["PICOIOT_MICROPYTHON"] = str(Path(path).resolve())


def micropython_info(binary: str | None = None) -> str:
    """What a measurement ran on, from the interpreter itself: its version line and whether it is a 32- or 64-bit
    build (sys.maxsize; objects and pointers on a 64-bit build are twice the size they are on a Pico W's RP2040)."""
    import subprocess
    binary = binary or micropython_bin()
    code = ("import sys\nv = sys.implementation.version\n"
            "print(sys.version.split('; ')[-1] + ', version ' + '.'.join(str(x) for x in v))\n"
            "print(64 if sys.maxsize > 2**32 else 32)")
    proc = subprocess.run([binary, "-c", code], capture_output=True, text=True, timeout=30)
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 2:
        return f"{binary}: does not run ({proc.stderr.strip()[:200]})"
    return f"{lines[0]}, {lines[1]}-bit (sys.maxsize), {binary}"


def mpy_cross_bin() -> str:
    return _bin("mpy-cross")


def microdot_dir() -> Path:
    import microdot
    return Path(microdot.__file__).parent
