"""Shared helpers for the device speed benchmarks (bench/device_api.py, bench/ws_stream.py): a controller started
under the unix micropython from the .mpy bundle (firmware/main_sim.py, control plane away = degraded mode, as
tests/host/test_device_sim.py does), device-scoped tokens, percentiles."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import heaplib

KEY = "ab" * 32
#: Heap the controllers need today on the 64-bit unix port (docs/devices.md, Limitations; test_device_sim.py).
DEFAULT_HEAP_K = 320


def token(device_id: str, role: str = "viewer", key: str = KEY, ttl_s: int = 3600) -> str:
    """A device-scoped JWT (HS256 with the device key), as `picoiot token` mints it."""
    import jwt
    return jwt.encode({"sub": "bench", "role": role, "aud": device_id, "exp": int(time.time()) + ttl_s}, key, "HS256")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


class Device:
    """One controller process (micropython, .mpy, -X heapsize=heap_k) with its local API on a free port: a
    picoiot.procs.DeviceChild, as `picoiot sim` and the device tests run it."""

    def __init__(self, workdir: Path, kind: str, heap_k: int, config: dict | None = None):
        from picoiot.procs import DeviceChild
        self.id = f"bench-{kind}"
        self.port = heaplib.free_port()
        dead = heaplib.free_port()  # nothing listens there: the control plane is away
        workdir.mkdir(parents=True, exist_ok=True)
        settings = {"device_id": self.id, "device_key": KEY, "kind": kind, "port": self.port,
                    "service_discovery_url": f"http://127.0.0.1:{dead}/api/devices",
                    "flash_dir": str(workdir / "flash"), "config": config or {}}
        (workdir / "dev.json").write_text(json.dumps(settings))
        heaplib.bundle()
        self.child = DeviceChild(workdir / "dev.json", heap=f"{heap_k}K", bundle=heaplib.BUILD,
                                 log=workdir / "device.log")
        self.child.restart_on_reset = False  # a reset during a measurement is a failure, not a reboot to wait for
        self.child.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.alive():
            if "picoiot device " in self.output():
                return
            time.sleep(0.05)
        out = self.stop()
        raise RuntimeError(f"{kind} device did not come up at {heap_k}K:\n{out[-3000:]}")

    @property
    def proc(self):
        return self.child.proc

    def output(self) -> str:
        return self.child.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.child.poll() is None

    def stop(self) -> str:
        self.child.stop()
        return self.output()


def machine() -> str:
    import platform
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU ({cpu or platform.processor()}), {platform.system()} {platform.machine()}"
