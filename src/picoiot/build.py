"""Compile firmware to .mpy with mpy-cross (what ships to a board and what the unix port runs in simulation)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import paths

# microdot modules a device bundle needs (the core and the WebSocket extension); microdot's other
# extensions stay off the board.
MICRODOT_MODULES = ("__init__.py", "microdot.py", "websocket.py", "helpers.py")


class BuildError(RuntimeError):
    pass


def compile_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # several test runs may build at once
    proc = subprocess.run([paths.mpy_cross_bin(), "-o", str(tmp), "-s", src.name, str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"mpy-cross failed on {src}:\n{proc.stderr}{proc.stdout}")
    os.replace(tmp, dst)


def compile_tree(src_root: Path, dst_root: Path, files: list[Path] | None = None) -> list[Path]:
    """Compile every .py under src_root (or the given files) to dst_root, keeping the layout."""
    out = []
    for src in files if files is not None else sorted(src_root.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        rel = src.relative_to(src_root).with_suffix(".mpy")
        dst = dst_root / rel
        compile_file(src, dst)
        out.append(dst)
    return out


def build_firmware(dst_root: Path, with_microdot: bool = True) -> list[Path]:
    """The device bundle: iotlib, the controllers and microdot, all as .mpy."""
    out = compile_tree(paths.FIRMWARE, dst_root)
    if with_microdot:
        md = paths.microdot_dir()
        out += compile_tree(md, dst_root / "microdot", [md / m for m in MICRODOT_MODULES if (md / m).exists()])
    return out


#: What stays outside the ROMFS image: the launcher that mounts it (it must be importable before /rom exists).
ROMFS_LAUNCHER = "boot_romfs.mpy"


def build_romfs(out: Path) -> Path:
    """The device bundle in `out` (as build_firmware) plus `out/romfs.img`: a ROMFS image (`mpremote romfs build`) of
    iotlib, the controllers, main_sim and microdot — everything but the launcher. On a Pico W (MicroPython >= 1.25)
    `mpremote romfs deploy` writes the same tree to the ROM partition, so the bytecode runs in place from flash instead
    of being loaded into the 192K heap; under the unix port `boot_romfs` mounts the image from one buffer."""
    import shutil
    import sys

    build_firmware(out)
    stage = out / f".romfs-src.{os.getpid()}"  # several runs may build the same bundle at once
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for p in sorted(out.iterdir()):
        if p.name.startswith(".") or p.name == ROMFS_LAUNCHER or p.suffix == ".img":
            continue
        if p.is_dir():
            shutil.copytree(p, stage / p.name, ignore=shutil.ignore_patterns(".*"))
        elif p.suffix == ".mpy":
            shutil.copy(p, stage / p.name)
    img = out / "romfs.img"
    tmp = out / f".romfs.img.{os.getpid()}.tmp"
    mpremote = Path(sys.executable).with_name("mpremote")
    cmd = [str(mpremote) if mpremote.exists() else "mpremote", "romfs", "--no-mpy", "-o", str(tmp), "build", str(stage)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(stage, ignore_errors=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"mpremote romfs build failed:\n{proc.stderr}{proc.stdout}")
    os.replace(tmp, img)
    return img
