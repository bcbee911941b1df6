"""Compile firmware to .mpy with mpy-cross (what ships to a board and what the unix port runs in simulation)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import bundles, paths

#: The bundle manifests (bundles/<unit>/manifest.py) a build reads: what goes onto a board, and that plus the simulated
#: board for the unix port.
BOARD_UNIT = "board"
SIM_UNIT = "sim"


class BuildError(RuntimeError):
    pass


def _defined_name(node):
    import ast
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def source_name(src: Path, root: Path | None = None, package: str = "") -> str:
    """The name a .mpy carries for tracebacks: the module's dotted name ("iotlib.metrics", "microdot" for a package's
    __init__), relative to root inside package. MicroPython interns that name on import anyway, so the source name
    costs no entry of its own in the interned-name pool — a file name ("metrics.py") would be one more per module,
    ≈ 27 on a device (docs/benchmarks.md, "Device memory")."""
    rel = src.relative_to(root) if root is not None else Path(src.name)
    parts = ([package] if package else []) + list(rel.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _varuint(data: bytes, i: int) -> tuple[int, int]:
    n = 0
    while True:
        b = data[i]
        i += 1
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            return n, i


def embedded_source_name(mpy: Path) -> str | None:
    """The source name a .mpy (v6) carries: the first entry of its qstr table, after the 4-byte header and the
    qstr/object counts. None if unreadable (a cached file from an older build convention is then rebuilt)."""
    try:
        with open(mpy, "rb") as f:
            data = f.read(300)  # the header and the first qstr: enough for any module name
        _, i = _varuint(data, 4)
        _, i = _varuint(data, i)
        n, i = _varuint(data, i)
        if n & 1:  # a static qstr: not a name this build writes
            return None
        return data[i:i + (n >> 1)].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def compile_file(src: Path, dst: Path, name: str | None = None) -> None:
    """src → dst with mpy-cross, unless dst is up to date. name: the source name embedded (default: the module name
    of src's file name)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    name = name or source_name(src)
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime and embedded_source_name(dst) == name:
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # several test runs may build at once
    proc = subprocess.run([paths.mpy_cross_bin(), "-o", str(tmp), "-s", name, str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"mpy-cross failed on {src}:\n{proc.stderr}{proc.stdout}")
    os.replace(tmp, dst)


def compile_tree(src_root: Path, dst_root: Path, files: list[Path] | None = None, package: str = "") -> list[Path]:
    """Compile every .py under src_root (or the given files) to dst_root, keeping the layout. package: the dotted
    package src_root is (for the source names), e.g. "microdot"."""
    out = []
    for src in files if files is not None else sorted(src_root.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        rel = src.relative_to(src_root).with_suffix(".mpy")
        dst = dst_root / rel
        compile_file(src, dst, source_name(src, src_root, package))
        out.append(dst)
    return out


def simulator_names() -> set[str]:
    """The top-level names (packages, module files) of the test equipment a board bundle never contains."""
    return bundles.tops(SIM_UNIT) - bundles.tops(BOARD_UNIT)


def is_simulator(rel: Path) -> bool:
    """rel (relative to firmware/ or to a build directory, .py or .mpy) is test equipment, not board code."""
    top = rel.parts[0]
    sim = simulator_names()
    return top in sim or Path(top).with_suffix(".py").name in sim


def microdot_modules() -> tuple[str, ...]:
    """The microdot modules of the benches' hello-world baseline (bundles/microdot/manifest.py: the core only)."""
    return tuple(f.rel.split("/", 1)[1] for f in bundles.read("microdot"))


def build_firmware(dst_root: Path, with_microdot: bool = False, simulator: bool = True) -> list[Path]:
    """The device bundle as .mpy: what bundles/board/manifest.py names (iotlib, the controllers, main).
    with_microdot: also the stock microdot (bundles/microdot: the hello-world baseline of the benchmarks; the device
    does not use it, and a bundle built without it has none left over). simulator: bundles/sim/manifest.py instead,
    the board bundle plus the simulated board and its launchers, for running the bundle on the unix port; False is
    the bundle for a board (`picoiot firmware build`), and removes any simulator left in dst_root."""
    import shutil
    files = bundles.read(SIM_UNIT if simulator else BOARD_UNIT)
    src = sorted(f.src for f in files if f.base == paths.FIRMWARE)
    out = compile_tree(paths.FIRMWARE, dst_root, src)
    if not simulator:
        for name in simulator_names():
            target = dst_root / Path(name).with_suffix(".mpy" if name.endswith(".py") else "")
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    shutil.rmtree(dst_root / ".slim", ignore_errors=True)  # sources an older build generated: never in a bundle
    if with_microdot:
        md = paths.microdot_dir()
        modules = microdot_modules()
        files = [md / m for m in modules]
        for old in (dst_root / "microdot").glob("*.mpy"):  # an extension an earlier build shipped
            if old.with_suffix(".py").name not in modules:
                old.unlink()
        out += compile_tree(md, dst_root / "microdot", files, "microdot")
    else:
        shutil.rmtree(dst_root / "microdot", ignore_errors=True)
    return out


#: What stays outside the ROMFS image: the launcher that mounts it (it must be importable before /rom exists).
ROMFS_LAUNCHER = "boot_romfs.mpy"


def build_romfs(out: Path, simulator: bool = True) -> Path:
    """The device bundle in `out` (as build_firmware) plus `out/romfs.img`: a ROMFS image (`mpremote romfs build`) of
    iotlib and the controllers (with `simulator`: also picosim and main_sim — everything but the launcher).
    On a Pico W (MicroPython >= 1.25) `mpremote romfs deploy` writes the same tree to the ROM partition, so the bytecode
    runs in place from flash instead of being loaded into the 192K heap; under the unix port `boot_romfs` mounts the
    image from one buffer."""
    build_firmware(out, simulator=simulator)
    return _romfs(out, out / "romfs.img", lambda rel: simulator or not is_simulator(rel))


def build_sim_romfs(out: Path) -> Path:
    """`out/sim.img`: a ROMFS image of the simulator alone (picosim and main_sim), for the memory benches' mpy mode:
    the bundle's board code is loaded from .mpy into the heap as on a board, while the simulated board, which a Pico W
    has built in, runs in place from the image and takes no heap (boot_romfs mounts it)."""
    build_firmware(out)
    return _romfs(out, out / "sim.img", lambda rel: is_simulator(rel))


def _romfs(out: Path, img: Path, keep) -> Path:
    import shutil
    import sys

    stage = out / f".romfs-src.{img.stem}.{os.getpid()}"  # several runs may build the same bundle at once
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for p in sorted(out.iterdir()):
        if p.name.startswith(".") or p.name == ROMFS_LAUNCHER or p.suffix == ".img" or not keep(Path(p.name)):
            continue
        if p.is_dir():
            shutil.copytree(p, stage / p.name, ignore=shutil.ignore_patterns(".*"))
        elif p.suffix == ".mpy":
            shutil.copy(p, stage / p.name)
    tmp = out / f".{img.name}.{os.getpid()}.tmp"
    mpremote = Path(sys.executable).with_name("mpremote")
    cmd = [str(mpremote) if mpremote.exists() else "mpremote", "romfs", "--no-mpy", "-o", str(tmp), "build", str(stage)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(stage, ignore_errors=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"mpremote romfs build failed:\n{proc.stderr}{proc.stdout}")
    os.replace(tmp, img)
    return img
