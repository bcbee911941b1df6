"""Child processes for `picoiot demo` and `picoiot sim` (and the device tests): the control plane and simulated devices.

Every child runs in its own process group (so a signal reaches whatever it spawned) and writes its output to a log
file. A simulated device that exits with status 75 (`picosim.RESET_EXIT_CODE`: a simulated reset, e.g. after
`POST /reboot`) is started again with the same settings and flash directory, as a board boots again after a reset.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import httpx

from . import build, paths

RESET_EXIT_CODE = 75  # picosim.RESET_EXIT_CODE
RUNTIMES = ("micropython", "cpython")


class ProcError(RuntimeError):
    pass


def free_port(kind: int = socket.SOCK_STREAM, preferred: int = 0) -> int:
    """`preferred` if it can be bound on 127.0.0.1 now, else any free port (also when `preferred` is past 65535: a
    port next to one at the top of the range, such as the demo's SNTP port + 123 or its devices' + 1)."""
    for port in ((preferred, 0) if 0 < preferred <= 65535 else (0,)):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ProcError("no free port")  # pragma: no cover


def heap_bytes(heap: str) -> int:
    h = heap.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(h[-1:], 1)
    return int(h.rstrip("KM")) * mult


def write_json(path: Path, obj, mode: int = 0o644) -> None:
    """Atomically (temp + rename); key files and settings are 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no simulated device or
    control plane outlives the `picoiot demo`/`sim` that started it. Children run in their own process group (a
    terminal's Ctrl-C reaches only the supervisor, which then stops them in order), so this is their only link."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's own cleanup is all there is
        pass


class Child:
    """One supervised child process: start(), poll(), stop(); output appended to `log`."""

    restart_on_reset = False
    #: Seconds a child gets to stop after SIGTERM before SIGKILL.
    stop_timeout_s = 10.0

    def __init__(self, name: str, log: Path):
        self.name = name
        self.log = log
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.exit_status: Optional[int] = None
        self.log_start = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> "Child":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.log_start = out.tell()  # what this run wrote starts here
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(), start_new_session=True, preexec_fn=_die_with_parent)
        self.exit_status = None
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll(self) -> Optional[int]:
        """None while running (or restarted after a simulated reset), else the exit status."""
        if self.proc is None:
            return self.exit_status
        rc = self.proc.poll()
        if rc is None:
            return None
        self.proc = None
        if rc == RESET_EXIT_CODE and self.restart_on_reset:
            self.restarts += 1
            self.start()
            return None
        self.exit_status = rc
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> Optional[int]:
        """Signal the whole process group, wait, SIGKILL after stop_timeout_s. Returns the exit status."""
        p = self.proc
        if p is None:
            return self.exit_status
        self.proc = None
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self.exit_status = p.returncode
        return p.returncode

    def kill(self) -> None:
        """SIGKILL, no restart: a power cut."""
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


class ServerChild(Child):
    """`picoiot server` on a fixed port (so it can be restarted on the same address) with an SNTP responder."""

    def __init__(self, data_dir: Path, port: int = 0, sntp_port: int = 0, db: Optional[str] = None,
                 extra: tuple[str, ...] = (), log: Optional[Path] = None):
        super().__init__("control-plane", log or data_dir / "server.log")
        self.data_dir = data_dir
        self.port = port or free_port()
        self.sntp_port = sntp_port or free_port(socket.SOCK_DGRAM)
        self.db = db
        self.extra = extra
        self.url = f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "picoiot.cli", "server", "--data-dir", str(self.data_dir), "--port", str(self.port),
             "--sntp-port", str(self.sntp_port), *self.extra]
        return a + (["--db", self.db] if self.db else [])

    def start(self, timeout_s: float = 30) -> "ServerChild":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise ProcError(f"picoiot server exited:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcError(f"picoiot server did not answer /health within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.05)


#: The heap a simulated device gets by default (`picoiot demo`, `picoiot sim`, the device tests): the 64-bit unix
#: port's measured minimum for the controller's standard scenario with its code as .mpy (relays 248K, sensors 288K on
#: 2026-12-03, bench/device_memory.py, docs/benchmarks.md "Device memory after issue 11 cuts"), plus the simulated board
#: these runs load into the heap (≈ 20K), plus room for what the device tests do beyond the scenario (generated
#: requests, ~100 relay switches, request lines at the documented 2,048-byte limit; the seed's sensors example ran out
#: of heap at 336K, so sensors keeps 384K). An OTA update of the whole bundle is installed by an update boot and fits in
#: the same heap. A Pico W's own figures (32-bit, simulator out of the count) are
#: smaller: docs/benchmarks.md.
DEFAULT_HEAP = {"relays": "320K", "sensors": "384K"}


class DeviceChild(Child):
    """A simulated device: firmware/main_sim.py under the unix micropython (.mpy bundle, `-X heapsize`) or CPython.
    `settings` is main_sim's settings file (key file + kind, port, flash_dir)."""

    restart_on_reset = True

    def __init__(self, settings: Path, runtime: str = "micropython", heap: str = "192K",
                 bundle: Optional[Path] = None, log: Optional[Path] = None, entry: str = "main_sim",
                 extra_path: Optional[Path] = None):
        """entry: the module to run (main_sim, or a wrapper of it found in extra_path: .mpy for micropython,
        .py for CPython)."""
        s = json.loads(settings.read_text())
        super().__init__(s["device_id"], log or settings.with_suffix(".log"))
        if runtime not in RUNTIMES:
            raise ProcError(f"runtime must be one of {', '.join(RUNTIMES)}")
        if runtime == "micropython" and bundle is None:
            raise ProcError("micropython needs the .mpy bundle (picoiot.build.build_firmware)")
        self.settings = settings
        self.device_id = s["device_id"]
        self.kind = s.get("kind", "relays")
        self.port = int(s.get("port", 80))
        # main_sim's settings name the flash; a board settings file (main.py) sits in it or names it under "sim"
        self.flash_dir = Path(s.get("flash_dir") or (s.get("sim") or {}).get("flash_dir") or settings.parent)
        self.runtime = runtime
        self.heap = heap
        self.bundle = bundle
        self.url = f"http://127.0.0.1:{self.port}"
        self.entry = entry
        self.extra_path = extra_path

    def argv(self) -> list[str]:
        if self.runtime == "micropython":
            return [paths.micropython_bin(), "-X", f"heapsize={self.heap}", "-m", self.entry, str(self.settings)]
        script = paths.FIRMWARE / "main_sim.py" if self.entry == "main_sim" else self.extra_path / f"{self.entry}.py"
        return [sys.executable, str(script), str(self.settings)]

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        extra = f"{self.extra_path}:" if self.extra_path else ""
        if self.runtime == "micropython":
            e["MICROPYPATH"] = f"{self.bundle}:{extra}.frozen"  # MICROPYPATH replaces the default path
        else:
            e["PYTHONPATH"] = f"{extra}{paths.FIRMWARE}" + (f":{e['PYTHONPATH']}" if e.get("PYTHONPATH") else "")
        return e

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 60, stop: Optional[Callable[[], bool]] = None) -> None:
        """Until GET /ready answers 200; ProcError if the process ends for good (not a reset) or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            rc = self.poll()
            if rc is not None:
                raise ProcError(f"device {self.name} exited with status {rc}" + _why(self.tail()))
            if stop is not None and stop():
                raise ProcError(f"device {self.name} failed while starting" + _why(self.tail()))
            if time.monotonic() > deadline:
                raise ProcError(f"device {self.name} not ready within {timeout_s:.0f} s" + _why(self.tail()))
            time.sleep(0.1)

    def out_of_memory(self) -> bool:
        """This run (since the last start) hit a MemoryError: the heap is too small for the firmware."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_start)
                return b"MemoryError" in f.read()
        except OSError:
            return False


def _why(log_tail: str) -> str:
    lines = [ln for ln in log_tail.splitlines() if ln.strip()]
    return (":\n  " + "\n  ".join(lines[-6:])) if lines else ""


def ensure_bundle(dst: Path) -> Path:
    """The firmware as .mpy (iotlib, the controllers, main_sim and the simulated board) in dst; only what changed is recompiled."""
    build.build_firmware(dst)
    return dst


def micropython_available() -> bool:
    try:
        paths.micropython_bin()
        paths.mpy_cross_bin()
        return True
    except FileNotFoundError:
        return False


def provision_over_api(url: str, admin_token: str, device_id: str, kind: Optional[str], namespace: str = "default",
                       overrides: Optional[dict] = None) -> Optional[dict]:
    """Enroll a device through the operators' API → its key file, or None if the device already exists (409).
    `overrides` (config) are set before the device first asks for its config."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=20) as c:
        r = c.post(f"/api/v1/namespaces/{namespace}/devices", json={"device_id": device_id, "device_type": kind})
        if r.status_code == 409:
            return None
        if r.status_code != 201:
            raise ProcError(f"provisioning {device_id}: HTTP {r.status_code} {r.text[:300]}")
        key = r.json()
        if overrides:
            r = c.patch(f"/api/v1/namespaces/{namespace}/devices/{device_id}/config", json={"overrides": overrides})
            if r.status_code != 200:
                raise ProcError(f"config for {device_id}: HTTP {r.status_code} {r.text[:300]}")
        return key


def device_settings(path: Path, key: dict, kind: str, port: int, flash_dir: Path) -> Path:
    s = dict(key, kind=kind, port=port, flash_dir=str(flash_dir), host="127.0.0.1")
    write_json(path, s, 0o600)
    return path


class DeviceWatch:
    """Tells, once each, about a device's simulated resets (DeviceChild.poll restarts it) and about its exit.
    Shared by `picoiot demo` and `picoiot sim`; call check() from their supervision loop."""

    def __init__(self, devices: list, say: Callable[[str], None], gone: set | None = None) -> None:
        self.devices = devices
        self.say = say
        self._restarts = {d.device_id: d.restarts for d in devices}
        self._gone = set(gone or ())

    def check(self) -> None:
        for d in self.devices:
            rc = d.poll()
            if d.restarts != self._restarts[d.device_id]:
                self._restarts[d.device_id] = d.restarts
                self.say(f"{d.device_id}: simulated reset, started again (same flash)")
            if rc is not None and d.device_id not in self._gone:
                self._gone.add(d.device_id)
                self.say(f"[red]{d.device_id} exited with status {rc}[/] (log: {d.log})")
