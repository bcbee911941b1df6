"""End-to-end harness: a real `picoiot server` process and real simulated devices (firmware/main_sim.py under the unix
micropython from .mpy with a Pico-sized heap), driven with real clients (httpx, websockets, curl).

Heaps: the goal is 192K (a Pico W's GC heap). The controllers do not fit yet (see docs/benchmarks.md), so the tests run
each kind with headroom over the smallest heap measured; PICOIOT_TEST_HEAP_RELAYS / PICOIOT_TEST_HEAP_SENSORS
override, PICOIOT_TEST_RUNTIME=cpython runs the same tests on CPython.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from picoiot import paths
from picoiot.procs import DEFAULT_HEAP, DeviceChild, device_settings, free_port, provision_over_api
from picoiot.server.auth import device_local_token
from support.servers import ServerProcess
from support.waits import wait_until  # noqa: F401  (the device tests' name)

RUNTIME = os.environ.get("PICOIOT_TEST_RUNTIME", "micropython")
# The default heaps of `picoiot demo`/`sim` (the measured need plus room, docs/benchmarks.md): these tests check
# behaviour; the heap figure is the benchmark's job (bench/device_memory.py, tests/host/test_device_memory_smoke.py).
HEAP = {"relays": os.environ.get("PICOIOT_TEST_HEAP_RELAYS", DEFAULT_HEAP["relays"]),
        "sensors": os.environ.get("PICOIOT_TEST_HEAP_SENSORS", DEFAULT_HEAP["sensors"])}
BUNDLE = paths.REPO / "build" / "devices-test"
MP_DIR = Path(__file__).resolve().parent / "mp"    # test-only device entry points (pinlog_sim: pin transition log)
SCRIPTS = paths.REPO / "build" / "devices-test-scripts"
NS = "default"

#: Config every test device starts with: heartbeats every second (config and desired-state changes reach the device
#: quickly), no public NTP servers (there is no Internet here: the control plane's SNTP responder is used), and a rate
#: limit high enough for the tests that are not about it (all clients share 127.0.0.1, so one bucket).
BASE_CONFIG: dict[str, Any] = {"heartbeat_interval_s": 1, "time": {"servers": []},
                               "api": {"rate_per_s": 500, "burst": 500}}


class ControlPlane(ServerProcess):
    """The control plane as an operator sees it: a `picoiot server` subprocess (with its SNTP responder) plus an
    admin's clients."""

    def __init__(self, data_dir: Path):
        super().__init__(data_dir, sntp=True)

    def token(self, role: str = "admin", ns: str = NS, sub: str | None = None, ttl: int = 3600) -> str:
        return super().token(role, ns, sub or f"test-{role}", ttl)

    def api(self, role: str = "admin") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token(role)}"}, timeout=20)

    def call(self, method: str, path: str, role: str = "admin", **kw) -> Any:
        with self.api(role) as c:
            r = c.request(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def device(self, dev_id: str) -> dict:
        return self.call("GET", f"/api/v1/namespaces/{NS}/devices/{dev_id}", "viewer")

    def config(self, dev_id: str) -> dict:
        return self.call("GET", f"/api/v1/namespaces/{NS}/devices/{dev_id}/config", "viewer")

    def patch_config(self, dev_id: str, overrides: dict) -> int:
        """Merge into the device's overrides; returns the new config version."""
        return self.call("PATCH", f"/api/v1/namespaces/{NS}/devices/{dev_id}/config",
                         json={"overrides": overrides})["version"]

    def shadow(self, dev_id: str) -> dict:
        return self.call("GET", f"/api/v1/namespaces/{NS}/devices/{dev_id}/shadows/default", "viewer")

    def desire(self, dev_id: str, desired: dict) -> dict:
        return self.call("POST", f"/api/v1/namespaces/{NS}/devices/{dev_id}/shadows/default", "operator",
                         json={"state": {"desired": desired}})


class Device:
    """One simulated device process and the clients to talk to it."""

    def __init__(self, cp: ControlPlane, tmp: Path, dev_id: str, kind: str, config: dict | None = None,
                 pinlog: bool = False, typed: bool = True):
        self.cp = cp
        self.id = dev_id
        self.kind = kind
        # typed=False: enrolled without a device type, which the device's registration then tells the server
        key = provision_over_api(cp.url, cp.token(), dev_id, kind if typed else None, NS,
                                 overrides=_merge(BASE_CONFIG, config or {}))
        assert key is not None, f"{dev_id} already enrolled"
        self.key = key["device_key"]
        settings = device_settings(tmp / f"{dev_id}.json", key, kind, free_port(), tmp / f"{dev_id}.flash")
        entry = {"entry": "pinlog_sim", "extra_path": SCRIPTS if RUNTIME == "micropython" else MP_DIR} if pinlog else {}
        self.child = DeviceChild(settings, runtime=RUNTIME, heap=HEAP[kind], bundle=BUNDLE, log=tmp / f"{dev_id}.log",
                                 **entry)
        self.url = self.child.url
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"

    def start(self, timeout: float = 60) -> "Device":
        self.child.start()
        self.child.wait_ready(timeout)
        return self

    def stop(self) -> None:
        self.child.stop()

    def token(self, role: str) -> str:
        return device_local_token(self.key, self.id, role, 3600, sub=f"test-{role}")

    def headers(self, role: str | None) -> dict:
        return {"Authorization": f"Bearer {self.token(role)}"} if role else {}

    def client(self, role: str | None = "admin") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(role), timeout=10)

    def get(self, path: str, role: str | None = "viewer", **kw) -> httpx.Response:
        with self.client(role) as c:
            return c.get(path, **kw)

    def post(self, path: str, role: str | None = "operator", **kw) -> httpx.Response:
        with self.client(role) as c:
            return c.post(path, **kw)

    def info(self) -> dict:
        r = self.get("/info")
        assert r.status_code == 200, r.text
        return r.json()

    def relays(self) -> dict[str, str]:
        r = self.get("/gpio")
        assert r.status_code == 200, r.text
        return {x["name"]: x["state"] for x in r.json()["relays"]}

    def pinlog(self, timeout: float = 15) -> dict:
        """The simulated board's pin transitions {"events": [[ms, pin, level], ...], "dropped": n} (pinlog_sim), as
        written after this call began: so it holds every switch the device made before the call (the file is
        rewritten every 100 ms; an older copy can miss the last switches and still look settled)."""
        import json
        path = self.child.flash_dir / "pinlog.json"
        asked = time.time()

        def fresh():
            try:
                if path.stat().st_mtime > asked:
                    return json.loads(path.read_text())
            except (OSError, ValueError):
                pass
            return None
        return wait_until(fresh, timeout, f"{self.id}'s pin log to be written after {asked:.3f}")

    def configure(self, overrides: dict, timeout: float = 30) -> int:
        """Change the device's config on the control plane and wait until the device runs that version."""
        v = self.cp.patch_config(self.id, overrides)
        wait_until(lambda: self._config_version() == v, timeout, f"{self.id} to apply config v{v}")
        return v

    def _config_version(self) -> int | None:
        try:
            r = self.get("/info")
        except httpx.TransportError:
            return None
        return r.json().get("config_version") if r.status_code == 200 else None

    def wait_restarted(self, restarts: int, timeout: float = 60) -> None:
        """After a simulated reset: the process was started again (DeviceChild restarts it) and is ready."""
        wait_until(lambda: self.child.poll() is None and self.child.restarts >= restarts, timeout,
                   f"{self.id} to restart")
        self.child.wait_ready(timeout)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: The heap of a device with OTA on: its normal heap, since an update boot loads nothing else (docs/ota.md).
OTA_HEAP = os.environ.get("PICOIOT_TEST_HEAP_OTA", DEFAULT_HEAP["relays"])


def ota_signing_key(cp: ControlPlane, directory: Path) -> tuple[Path, str]:
    """A new release-signing key in directory, its public half set as the namespace's OTA key: (key file, public)."""
    from picoiot import ota_cli
    key = directory / "ota.key"
    pub = ota_cli.keygen(key)
    ota_cli.set_key(cp.url, cp.token(), NS, pub)
    return key, pub


def with_ota(d: Device, pub: str) -> Device:
    """A device made with start=False, set up to accept releases signed with pub (at OTA_HEAP)."""
    import json
    s = json.loads(d.child.settings.read_text())
    s["ota_public_key"] = pub
    d.child.settings.write_text(json.dumps(s))
    d.child.heap = OTA_HEAP
    return d
