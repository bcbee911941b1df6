"""Shared helpers for the memory benchmarks: find the minimum `-X heapsize` at which a MicroPython run succeeds.

A run "succeeds" when the caller's check says so (exit status, expected output, no MemoryError, all HTTP answers as
expected). The search is a bisection over KiB, each candidate confirmed by a second run so one lucky run can't set the
figure.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from picoiot import build, paths  # noqa: E402
from picoiot.procs import free_port  # noqa: E402,F401  (the benches' name)

BUILD = REPO / "build" / "bench"


def bundle() -> Path:
    """Firmware compiled to .mpy (the bundle that goes onto a board) plus the stock microdot, which the device does not
    use but microdot's hello world, the baseline of the memory benches, does."""
    build.build_firmware(BUILD, with_microdot=True)
    return BUILD


def compile_script(src: Path) -> Path:
    """A bench script compiled to .mpy next to the bundle, so the measured code is all bytecode."""
    dst = BUILD / (src.stem + ".mpy")
    build.compile_file(src, dst)
    return dst


def romfs_image(modules: list[str], name: str = "romfs", lib: bool = True) -> Path:
    """A ROMFS image (mpremote romfs build) holding the bundle's iotlib (lib), the simulated board (picosim, test
    equipment that a Pico W has built in) and the given compiled bench modules, for runs that execute the bytecode in
    place (bench/mp_romfs.py; with lib=False: the simulator alone, mounted through PICOIOT_SIM_IMG by runs whose
    iotlib is loaded from .mpy)."""
    import shutil
    src = BUILD / name
    shutil.rmtree(src, ignore_errors=True)
    if lib:
        shutil.copytree(BUILD / "iotlib", src / "iotlib")
    shutil.copytree(BUILD / "picosim", src / "picosim")
    for m in modules:
        shutil.copy(BUILD / (m + ".mpy"), src)
    img = BUILD / f"{name}.img"
    mpremote = Path(sys.executable).with_name("mpremote")
    subprocess.run([str(mpremote), "romfs", "--no-mpy", "-o", str(img), "build", str(src)], check=True,
                   capture_output=True, text=True)
    return img


def sim_image() -> Path:
    """The simulator alone as a ROMFS image; a run given PICOIOT_SIM_IMG mounts it (mp_iotlib_all, mp_import_cost)."""
    return romfs_image([], "sim", lib=False)


def image_k(img: Path) -> int:
    return -(-img.stat().st_size // 1024)


def mp_env(extra: dict | None = None) -> dict:
    """MicroPython's environment for a bench run: the bundle on its path (extra: e.g. PICOIOT_SIM_IMG, the
    simulator's image for the run to mount, see sim_image())."""
    env = dict(os.environ, MICROPYPATH=f"{BUILD}:.frozen")
    env.update(extra or {})
    return env


def run_module(module: str, heap_k: int, args: list[str] = (), timeout: float = 120, env: dict | None = None):
    """Run `micropython -X heapsize=<heap_k>K -m module args…` to completion."""
    return subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap_k}K", "-m", module, *args],
                          capture_output=True, text=True, timeout=timeout, env=env or mp_env())


def start_module(module: str, heap_k: int, args: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([paths.micropython_bin(), "-X", f"heapsize={heap_k}K", "-m", module, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or mp_env())


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def min_heap(ok: Callable[[int], bool], lo: int = 8, hi: int = 512, settle: int = 0, step: int = 2) -> int | None:
    """Smallest heap (KiB) in [lo, hi] for which ok(heap) holds, confirmed twice; None if even hi fails.

    Near the threshold pass/fail is not monotonic (where the GC happens to leave holes decides whether one larger
    allocation fits), so bisection alone can land on a lucky heap. With settle=n the result is then raised in
    `step` KiB steps until n runs in a row pass there."""
    top = hi
    if not (ok(hi) and ok(hi)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid) and ok(mid):
            hi = mid
        else:
            lo = mid
    while settle and hi < top and not all(ok(hi) for _ in range(settle)):
        hi = min(top, hi + step)
    return hi


def http_get(port: int, path: str = "/", headers: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """One HTTP/1.0 GET on a fresh connection (what microdot serves); (status, body), status 0 on failure."""
    req = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
    for k, v in (headers or {}).items():
        req += f"{k}: {v}\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall((req + "\r\n").encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


def served_ok(module: str, heap_k: int, path: str = "/", requests: int = 50, concurrency: int = 4,
              headers: dict | None = None, expect: int = 200) -> bool:
    """Start a server module at heap_k, send `requests` GETs (`concurrency` at a time); True if every answer
    was `expect` and the process printed no MemoryError."""
    from concurrent.futures import ThreadPoolExecutor
    port = free_port()
    proc = start_module(module, heap_k, [str(port)])
    try:
        if not wait_port(port, proc):
            return False
        with ThreadPoolExecutor(concurrency) as ex:
            codes = list(ex.map(lambda _: http_get(port, path, headers)[0], range(requests)))
        alive = proc.poll() is None
    finally:
        proc.kill()
        out = proc.communicate()[0]
    return alive and all(c == expect for c in codes) and "MemoryError" not in out
