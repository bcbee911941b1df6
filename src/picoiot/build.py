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


#: microdot features a device never uses, left out of the device bundle's copy (`slim_microdot`): every name loaded
#: costs heap on the board (a function object, and an interned name for each new identifier or short string), and the
#: names of the stock module push the device past a doubling of MicroPython's interned-name pool (docs/benchmarks.md,
#: "Device memory"). Keys: "" for module level, else a class; values: the definitions (functions, methods,
#: attributes) removed. `microdot/__init__.py` re-exports what is left.
MICRODOT_SLIM = {
    "": ("urlencode", "abort", "redirect", "send_file"),
    # iotlib.web._Request parses and builds the device's requests, its App(Microdot) reads the connections
    "Request": ("__init__", "form", "files", "after_request", "create", "_safe_readline"),
    "Response": ("types_map", "default_send_file_max_age", "set_cookie", "delete_cookie", "redirect", "send_file"),
    "Microdot": ("get", "post", "put", "patch", "delete", "query", "mount", "abort", "start_server", "run",
                 "shutdown", "handle_request"),
}
MICRODOT_SLIM_INIT = ("from microdot.microdot import Microdot, Request, Response, URLPattern, AsyncBytesIO, "
                      "iscoroutine  # noqa: F401  (slimmed for the device: picoiot.build.slim_microdot)\n")


class BuildError(RuntimeError):
    pass


def _defined_name(node):
    import ast
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def slim_microdot(text: str) -> str:
    """microdot.py without the definitions named in MICRODOT_SLIM.
    Removed lines become blank lines, so line numbers in tracebacks still match the stock source. Raises BuildError
    when a name to remove is not found (a new microdot release moved things: revisit the list)."""
    import ast
    tree = ast.parse(text)
    lines = text.split("\n")
    todo = {(scope, name) for scope, names in MICRODOT_SLIM.items() for name in names}

    def blank(node):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
        for i in range(first - 1, node.end_lineno):
            lines[i] = ""

    def scan(body, scope):
        for node in body:
            name = _defined_name(node)
            if name is not None and (scope, name) in todo:
                todo.discard((scope, name))
                blank(node)
            elif isinstance(node, ast.ClassDef) and scope == "":
                scan(node.body, node.name)
    scan(tree.body, "")
    if todo:
        raise BuildError(f"slim_microdot: not found in this microdot: {sorted(map(str, todo))}")
    out = "\n".join(lines)
    compile(out, "microdot.py", "exec")
    return out


def _write_if_changed(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


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
    """The microdot modules a device bundle holds (bundles/microdot/manifest.py: the core only)."""
    return tuple(f.rel.split("/", 1)[1] for f in bundles.read("microdot"))


def build_firmware(dst_root: Path, with_microdot: bool = True, slim: bool = True, simulator: bool = True) -> list[Path]:
    """The device bundle as .mpy: what bundles/board/manifest.py names (iotlib, the controllers, main and microdot).
    slim: microdot without the features a device never uses (slim_microdot); False: the stock microdot (the
    hello-world baseline of the benchmarks). simulator: bundles/sim/manifest.py instead, the board bundle plus the
    simulated board and its launchers, for running the bundle on the unix port; False is the bundle for a board
    (`picoiot firmware build`), and removes any simulator left in dst_root."""
    files = bundles.read(SIM_UNIT if simulator else BOARD_UNIT)
    src = sorted(f.src for f in files if f.base == paths.FIRMWARE)
    out = compile_tree(paths.FIRMWARE, dst_root, src)
    if not simulator:
        import shutil
        for name in simulator_names():
            target = dst_root / Path(name).with_suffix(".mpy" if name.endswith(".py") else "")
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if with_microdot:
        md = paths.microdot_dir()
        modules = microdot_modules()
        files = [md / m for m in modules]
        for old in (dst_root / "microdot").glob("*.mpy"):  # an extension an earlier build shipped
            if old.with_suffix(".py").name not in modules:
                old.unlink()
        if slim:  # generated sources under dst_root/.slim (rewritten only when they change, so the .mpy stay cached)
            gen = dst_root / ".slim" / "microdot"
            files = [_write_if_changed(gen / "microdot.py", slim_microdot((md / "microdot.py").read_text())) if
                     f.name == "microdot.py" else
                     _write_if_changed(gen / "__init__.py", MICRODOT_SLIM_INIT + _version_line(md)) if
                     f.name == "__init__.py" else f for f in files]
            out += compile_tree(gen, dst_root / "microdot", [f for f in files if f.parent == gen], "microdot")
            out += compile_tree(md, dst_root / "microdot", [f for f in files if f.parent != gen], "microdot")
        else:
            if (dst_root / ".slim").exists():  # this directory held the slim build: recompile the stock modules
                import shutil
                shutil.rmtree(dst_root / ".slim")
                for f in files:
                    (dst_root / "microdot" / f.with_suffix(".mpy").name).unlink(missing_ok=True)
            out += compile_tree(md, dst_root / "microdot", files, "microdot")
    return out


def _version_line(md: Path) -> str:
    for line in (md / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return "\n" + line + "\n"
    return ""


#: What stays outside the ROMFS image: the launcher that mounts it (it must be importable before /rom exists).
ROMFS_LAUNCHER = "boot_romfs.mpy"


def build_romfs(out: Path, simulator: bool = True) -> Path:
    """The device bundle in `out` (as build_firmware) plus `out/romfs.img`: a ROMFS image (`mpremote romfs build`) of
    iotlib, the controllers and microdot (with `simulator`: also picosim and main_sim — everything but the launcher).
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
