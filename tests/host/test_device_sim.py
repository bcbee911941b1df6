"""firmware/main_sim.py as a process (unix micropython from .mpy, and CPython), with the control plane away: the device
must come up, print its one ready line, and serve its local API on its built-in config (degraded mode) — relays
switched over REST with each role, sensors sampled and streamed to a real WebSocket client."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
import websockets

from picoiot import build, paths

KEY = "ab" * 32
# Heaps the controllers need today on the 64-bit unix port (docs/devices.md, Limitations).
# Functional tests run the controllers with headroom: how small a heap they fit in is measured by
# bench/device_memory.py and guarded by tests/host/test_device_memory_smoke.py, not decided by flaky margins here.
HEAP = {"relays": "384K", "sensors": "384K"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token(dev: str, role: str, key: str = KEY) -> str:
    return jwt.encode({"sub": "test", "role": role, "aud": dev, "exp": int(time.time()) + 600}, key, "HS256")


class Device:
    def __init__(self, tmp: Path, kind: str, runtime: str, rate: bool = False, config: dict | None = None):
        self.id = f"{kind}-t"
        self.port = _free_port()
        dead = _free_port()  # nothing listens there: the control plane is away
        settings = {"device_id": self.id, "device_key": KEY, "kind": kind, "port": self.port,
                    "service_discovery_url": f"http://127.0.0.1:{dead}/api/devices", "flash_dir": str(tmp / "flash"),
                    "config": {"api": {"rate_per_s": 1000, "burst": 1000}}}
        if rate:
            settings["config"]["api"] = {"rate_per_s": 0.01, "burst": 3}
        settings["config"].update(config or {})
        (tmp / "dev.json").write_text(json.dumps(settings))
        if runtime == "micropython":
            out = paths.REPO / "build" / "devsim"
            build.build_firmware(out)
            cmd = [paths.micropython_bin(), "-X", f"heapsize={HEAP[kind]}", "-m", "main_sim", str(tmp / "dev.json")]
            env = dict(os.environ, MICROPYPATH=f"{out}:.frozen")
        else:
            cmd = [sys.executable, str(paths.FIRMWARE / "main_sim.py"), str(tmp / "dev.json")]
            env = dict(os.environ)
        self.log = open(tmp / "device.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=tmp)
        self.lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("picoiot device "):
                assert line.strip() == f"picoiot device {self.id} listening on http://127.0.0.1:{self.port}"
                self.url = f"http://127.0.0.1:{self.port}"
                return
        self.stop()
        raise AssertionError("device did not come up:\n" + "".join(self.lines[-30:]) + self._stderr())

    def _stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        try:
            return "".join(self.lines) + (out or "") + self._stderr()
        finally:
            self.log.close()


@pytest.fixture(params=["micropython", "cpython"])
def runtime(request):
    return request.param


def _metrics(c: httpx.Client, dev: Device) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = c.get("/metrics", headers={"Authorization": "Bearer " + _token(dev.id, "viewer")})
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def _check_common(c: httpx.Client, dev: Device):
    r = c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.json()["registered"] is False
    assert c.get("/info").status_code == 401
    info = c.get("/info", headers={"Authorization": "Bearer " + _token(dev.id, "viewer")}).json()
    assert info["device_id"] == dev.id and info["degraded"] is True and info["config_version"] == 0
    r = c.post("/reboot", headers={"Authorization": "Bearer " + _token(dev.id, "operator")})
    assert r.status_code == 403
    m = c.get("/metrics", headers={"Authorization": "Bearer " + _token(dev.id, "viewer")})
    assert m.status_code == 200 and "iotlib_http_requests_total" in m.text


def test_relays_device_serves_locally_without_control_plane(tmp_path, runtime):
    dev = Device(tmp_path, "relays", runtime)
    try:
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            _check_common(c, dev)
            viewer = {"Authorization": "Bearer " + _token(dev.id, "viewer")}
            op = {"Authorization": "Bearer " + _token(dev.id, "operator")}
            r = c.get("/gpio", headers=viewer)
            assert r.status_code == 200 and [x["name"] for x in r.json()["relays"]] == ["relay1", "relay2"]
            assert c.post("/gpio/relay1", json={"state": "on"}, headers=viewer).status_code == 403
            r = c.post("/gpio/relay1", json={"state": "on"}, headers=op)
            assert r.status_code == 200 and r.json()["state"] == "on"
            assert c.get("/gpio/relay1", headers=viewer).json()["state"] == "on"
            r = c.post("/gpio/relay9", json={"state": "on"}, headers=op)
            assert r.status_code == 404 and "relay9" in r.json()["error"]
            r = c.post("/gpio/relay2", content=b"{oops", headers=dict(op, **{"Content-Type": "application/json"}))
            assert r.status_code == 400 and r.json()["error"] == "request body is not valid JSON"
            r = c.post("/gpio/relay2", json={"state": "dim"}, headers=op)
            assert r.status_code == 400
            r = c.post("/gpio/relay2", json={"state": "on", "pulse_ms": 50}, headers=op)
            assert r.status_code == 200 and r.json()["state"] == "on"
            for _ in range(100):
                if c.get("/gpio/relay2", headers=viewer).json()["state"] == "off":
                    break
                time.sleep(0.05)
            assert c.get("/gpio/relay2", headers=viewer).json()["state"] == "off"
            samples = _metrics(c, dev)
            assert samples[("iotlib_relay_on", (("relay", "relay1"),))] == 1
            assert samples[("iotlib_relay_on", (("relay", "relay2"),))] == 0
            assert samples[("iotlib_relay_switches_total", (("relay", "relay2"),))] == 2  # on, then off by the pulse
            wrong = {"Authorization": "Bearer " + _token(dev.id, "admin", key="cd" * 32)}
            assert c.get("/gpio", headers=wrong).status_code == 401
    finally:
        out = dev.stop()
    assert "MemoryError" not in out, out[-3000:]
    assert KEY not in out  # the device key is never logged


def test_sensors_device_samples_and_streams_without_control_plane(tmp_path, runtime):
    dev = Device(tmp_path, "sensors", runtime)
    try:
        tok = _token(dev.id, "viewer")
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            _check_common(c, dev)
            snap = c.get("/sensors", headers={"Authorization": "Bearer " + tok}).json()
            assert sorted(snap["values"]) == ["cpu_temp", "humidity", "pressure", "temperature"]
            samples = _metrics(c, dev)
            assert 900 < samples[("iotlib_sensor_value", (("field", "pressure"),))] < 1100
            assert samples[("iotlib_sensor_faults", ())] == 0

        async def stream():
            ws_url = f"ws://127.0.0.1:{dev.port}/ws"
            with pytest.raises(websockets.InvalidStatus) as e:
                async with websockets.connect(ws_url):
                    pass
            assert e.value.response.status_code == 401
            async with websockets.connect(ws_url, subprotocols=["picoiot", "bearer." + tok]) as ws:
                assert ws.subprotocol == "picoiot"
                await ws.send(json.dumps({"type": "subscribe", "fields": ["temperature", "pressure"]}))
                ack = json.loads(await ws.recv())
                assert ack["type"] == "subscribed" and ack["fields"] == ["pressure", "temperature"]
                frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
                assert frames[1]["seq"] > frames[0]["seq"]
                assert sorted(frames[0]["values"]) == ["pressure", "temperature"]
                assert 900 < frames[0]["values"]["pressure"] < 1100  # the simulated BME280, in hPa
                await ws.send(json.dumps({"type": "launch"}))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd.code == 1003
        asyncio.run(stream())
    finally:
        out = dev.stop()
    assert "MemoryError" not in out, out[-3000:]


def test_rate_limit_429_with_retry_after(tmp_path, runtime):
    dev = Device(tmp_path, "relays", runtime, rate=True)
    try:
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            viewer = {"Authorization": "Bearer " + _token(dev.id, "viewer")}
            codes = [c.get("/gpio", headers=viewer).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
            r = c.get("/gpio", headers=viewer)
            assert r.status_code == 429 and r.json() == {"error": "rate limit exceeded"}
            assert int(r.headers["retry-after"]) >= 1
    finally:
        out = dev.stop()
    assert "MemoryError" not in out, out[-3000:]


def test_restore_mode_survives_a_simulated_reset(tmp_path, runtime):
    factory = {"api": {"rate_per_s": 1000, "burst": 1000},
               "relays": {"keep": {"pin": 2, "power_on": "restore"}, "boot_on": {"pin": 3, "power_on": "on"},
                          "plain": {"pin": 4}}}
    dev = Device(tmp_path, "relays", runtime, config=factory)
    admin = {"Authorization": "Bearer " + _token(dev.id, "admin")}
    try:
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            st = {x["name"]: x["state"] for x in c.get("/gpio", headers=admin).json()["relays"]}
            assert st == {"keep": "off", "boot_on": "on", "plain": "off"}
            assert c.post("/gpio/keep", json={"state": "on"}, headers=admin).status_code == 200
            assert c.post("/gpio/plain", json={"state": "on"}, headers=admin).status_code == 200
            r = c.post("/reboot", headers=admin)
            assert r.status_code == 202
        dev.proc.wait(timeout=15)
        assert dev.proc.returncode == 75  # picosim.RESET_EXIT_CODE: a reset, not a crash
    finally:
        out = dev.stop()
    assert "MemoryError" not in out, out[-3000:]
    dev = Device(tmp_path, "relays", runtime, config=factory)  # power up again on the same flash
    try:
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            st = {x["name"]: x["state"] for x in c.get("/gpio", headers=admin).json()["relays"]}
            assert st == {"keep": "on", "boot_on": "on", "plain": "off"}
            info = c.get("/info", headers=admin).json()
            assert info["reset_cause"] == "hard"
    finally:
        dev.stop()


def test_failsafe_applied_when_control_plane_stays_away(tmp_path, runtime):
    dev = Device(tmp_path, "relays", runtime, config={
        "failsafe_after_s": 1, "relays": {"heater": {"pin": 2, "failsafe": "off"}, "fan": {"pin": 3, "failsafe": "on"}}})
    op = {"Authorization": "Bearer " + _token(dev.id, "operator")}
    try:
        with httpx.Client(base_url=dev.url, timeout=10) as c:
            c.post("/gpio/heater", json={"state": "on"}, headers=op)
            for _ in range(100):
                info = c.get("/info", headers=op).json()
                if info["failsafe_active"]:
                    break
                time.sleep(0.1)
            assert info["failsafe_active"] is True
            assert info["relays"] == {"heater": "off", "fan": "on"}
    finally:
        out = dev.stop()
    assert "control plane away: relays at failsafe state" in out
