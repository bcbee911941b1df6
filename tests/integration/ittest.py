"""Integration-test harness: the firmware's protocol clients (firmware/iotlib) against a real control plane.

A scenario is device-side code in `tests/integration/mp/it_<name>.py` (`async def main(ctl)`), run either in this
process (CPython) or by the real unix MicroPython from .mpy with a 224K heap (HEAP). Whenever the scenario needs the
operator's side — provision a device, change config or desired state, stop the server, check what the server
recorded — it calls `ctl.ask(op, **args)`, which lands in `Operator.op_<op>(**args)` here (a direct call on CPython,
one JSON line each way over the subprocess's stdin/stdout on MicroPython). Server-side assertions live in those ops,
device-side ones in the scenario; an assertion failing on either side fails the test.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from picoiot import build, paths
from picoiot.procs import free_port

HERE = Path(__file__).resolve().parent
MP_DIR = HERE / "mp"
BUILD = paths.REPO / "build" / "integration"
#: The scenarios test the protocol, not a memory budget (tests/host/test_device_memory_smoke.py guards that): a
#: margin above what the busiest one needs on the 64-bit port (the outage scenario's re-registration ran out at 192K
#: after the 2026-12-03 merge).
HEAP = "224K"

#: a test marked with this runs against SQLite and PostgreSQL (the `backend` fixture)
BOTH_BACKENDS = pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                                        indirect=True)

CP_TESTS = paths.REPO / "tests" / "controlplane"
sys.path.insert(0, str(CP_TESTS))
from cptest import wait_until  # noqa: E402
from support.servers import ServerProcess  # noqa: E402,F401  (the conftest's and the tests' name)
from support.waits import metric  # noqa: E402,F401


def ensure_path() -> None:
    """CPython runtime: import iotlib from firmware/ and the scenarios from mp/."""
    for p in (str(paths.FIRMWARE), str(MP_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)


def build_bundle() -> tuple[Path, Path]:
    """(firmware bundle, compiled scenarios) as .mpy; compile_file skips what is up to date."""
    bundle, scripts = BUILD / "bundle", BUILD / "scripts"
    build.build_firmware(bundle)
    build.compile_tree(MP_DIR, scripts)
    return bundle, scripts


# ------------------------------------------------------------------------------------------------ servers
class LossyProxy:
    """A TCP relay to the control plane that can lose answers: with `drop_next` set, the next request is forwarded
    and fully processed by the server, but the client's connection is closed before the answer reaches it (a Wi-Fi
    drop at the worst moment). The device must retry, and the retry must not count twice."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.drop_next = 0
        self.forwarded = 0
        self.dropped = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url_for(self, url: str) -> str:
        """The same URL through this proxy."""
        return re.sub(r"^http://[^/]+", f"http://127.0.0.1:{self.port}", url)

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        drop = self.drop_next > 0
        if drop:
            self.drop_next -= 1
        with client, socket.create_connection(self.target) as upstream:
            client.settimeout(10)
            upstream.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:  # the device sends one request and Connection: close
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            need = head.index(b"\r\n\r\n") + 4 + (int(m.group(1)) if m else 0)
            while len(head) < need:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            upstream.sendall(head)
            answer = b""
            while chunk := upstream.recv(65536):  # the server closes after its answer (Connection: close)
                answer += chunk
            self.forwarded += 1
            if drop:
                self.dropped += 1
                client.shutdown(socket.SHUT_RDWR)
                return
            client.sendall(answer)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# ------------------------------------------------------------------------------------------------ operator side
class Operator:
    """The operator and the test's eyes on the server; `op_*` methods are what scenarios may ask for."""

    def __init__(self, server, tmp_path: Path, runtime: str, **params):
        self.server = server
        self.tmp_path = tmp_path
        self.runtime = runtime
        self.params = params
        self.device_id = params.pop("device_id", f"it-{runtime}")
        self.test_id = self.device_id
        self.ns = "default"
        self.failures: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self.proxy: LossyProxy | None = None
        self.key: str | None = None

    # --- plumbing ---
    def handle(self, op: str, args: dict):
        fn = getattr(self, "op_" + op, None)
        if fn is None:
            raise AssertionError(f"unknown orchestrator op {op!r}")
        return fn(**args)

    def api(self, method: str, path: str, role: str = "admin", expect: int | None = 200, **kw) -> httpx.Response:
        r = self.server.client.request(method, path, headers={"Authorization": f"Bearer {self.server.token(role)}"},
                                       **kw)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r

    @property
    def dev_path(self) -> str:
        return f"/api/v1/namespaces/{self.ns}/devices/{self.device_id}"

    def in_background(self, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except BaseException as e:  # surfaced by finish()
                self.failures.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._threads.append(t)

    def finish(self) -> None:
        for t in self._threads:
            t.join(30)
        if self.proxy is not None:
            self.proxy.close()
        if self.failures:
            raise self.failures[0]

    # --- ops: setup ---
    def op_setup(self, overrides: dict | None = None, device_type: str = "relays") -> dict:
        """Provision the device through the operators' API (derived key), optionally with config overrides."""
        r = self.api("POST", f"/api/v1/namespaces/{self.ns}/devices", expect=201,
                     json={"device_id": self.device_id, "device_type": device_type})
        kf = r.json()
        self.key = kf["device_key"]
        if overrides:
            self.api("PATCH", self.dev_path + "/config", json={"overrides": overrides})
        flash = self.tmp_path / "flash"
        flash.mkdir(exist_ok=True)
        return {"device_id": kf["device_id"], "device_key": kf["device_key"], "namespace": kf["namespace"],
                "sd_url": kf["service_discovery_url"], "device_type": device_type, "flash": str(flash),
                **self.params}

    def op_provision_cli(self) -> dict:
        """`picoiot provision` against the CLI server's data directory: the key file a device is flashed with. Run
        once per server (the CLI costs seconds of imports); later callers get the same key file."""
        cache = self.server.__dict__.setdefault("key_files", {})
        if "cli" not in cache:
            out = self.server.data_dir / "it-cli.json"
            cmd = [str(Path(sys.executable).parent / "picoiot"), "provision", "it-cli", "--type", "relays",
                   "--data-dir", str(self.server.data_dir), "--out", str(out), *self.server.db_args]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr + proc.stdout
            assert out.stat().st_mode & 0o777 == 0o600
            cache["cli"] = json.loads(out.read_text())
        kf = cache["cli"]
        assert kf["service_discovery_url"] == self.server.url + "/api/devices", kf
        self.key, self.device_id = kf["device_key"], kf["device_id"]
        flash = self.tmp_path / "flash"
        flash.mkdir(exist_ok=True)
        return {**kf, "sd_url": kf["service_discovery_url"], "flash": str(flash), **self.params}

    def op_provision_individual(self) -> dict:
        """A second device with an individual (random, server-stored) key, through the operators' API."""
        dev = self.test_id[:60] + "-ind"
        kf = self.api("POST", f"/api/v1/namespaces/{self.ns}/devices", expect=201,
                      json={"device_id": dev, "device_type": "relays", "key_mode": "individual"}).json()
        return {**kf, "sd_url": kf["service_discovery_url"], **self.params}

    # --- ops: operator actions ---
    def op_patch_config(self, overrides: dict) -> dict:
        """Merge into the device's config overrides (admin); returns {version}."""
        return {"version": self.api("PATCH", self.dev_path + "/config", json={"overrides": overrides})
                .json()["version"]}

    def op_set_desired(self, desired: dict) -> dict:
        """An operator sets desired state; returns the shadow's new version."""
        doc = self.api("POST", self.dev_path + "/shadows/default", role="operator",
                       json={"state": {"desired": desired}}).json()
        return {"version": doc["version"]}

    def op_when_waiting(self, kind: str, then: str, args: dict) -> None:
        """In the background: once one `kind` long-poll (config | state | heartbeat) is held by the server, run
        op_<then>(**args). Returns at once, so the device can start its long-poll."""
        def act():
            wait_until(lambda: metric(self.server.client, "picoiot_longpolls_waiting", kind=kind) >= 1, 20)
            self.handle(then, args)
        self.in_background(act)

    def op_proxy(self, drop_next: int = 0) -> str:
        """Route the device through a LossyProxy; returns the proxy's base URL."""
        if self.proxy is None:
            self.proxy = LossyProxy(int(self.server.url.rsplit(":", 1)[1]))
        self.proxy.drop_next = drop_next
        return f"http://127.0.0.1:{self.proxy.port}"

    # --- ops: what the server recorded ---
    def op_config_show(self) -> dict:
        return self.api("GET", self.dev_path + "/config", role="viewer").json()

    def op_shadow(self) -> dict:
        return self.api("GET", self.dev_path + "/shadows/default", role="viewer").json()

    def op_device(self, device_id: str | None = None) -> dict:
        path = f"/api/v1/namespaces/{self.ns}/devices/{device_id}" if device_id else self.dev_path
        return self.api("GET", path, role="viewer").json()

    def op_alarms(self, key: str | None = None) -> list:
        params = {"device": self.device_id, **({"key": key} if key else {})}
        return self.api("GET", f"/api/v1/namespaces/{self.ns}/alarms", role="viewer", params=params).json()["alarms"]

    def _liveness(self, online: bool) -> dict:
        wait_until(lambda: self.op_device()["online"] is online, 20)
        alarms = self.op_alarms(key="device_offline")
        assert len(alarms) == 1, alarms
        return {"device": self.op_device(), "alarm": alarms[0]}

    def op_wait_offline(self) -> dict:
        """Wait (bounded) until the server's sweep calls the device offline; returns the record and the alarm."""
        return self._liveness(False)

    def op_wait_online(self) -> dict:
        return self._liveness(True)

    def op_stop_server(self) -> None:
        self.server.stop()

    def op_start_server(self) -> None:
        self.server.start()

    def op_unused_udp_port(self) -> int:
        return free_port(socket.SOCK_DGRAM)

    def op_proxy_stats(self) -> dict:
        assert self.proxy is not None
        return {"forwarded": self.proxy.forwarded, "dropped": self.proxy.dropped}


# ------------------------------------------------------------------------------------------------ running scenarios
def run_scenario(runtime: str, name: str, op: Operator, tmp_path: Path, timeout: float = 60) -> dict:
    """Run it_<name>.main(ctl) on the given runtime with `op` answering its asks. Returns {"result", ...}."""
    if runtime == "cpython":
        return _run_cpython(name, op)
    return _run_micropython(name, op, tmp_path, timeout)


def _run_cpython(name: str, op: Operator) -> dict:
    import asyncio
    import importlib
    ensure_path()
    from iotlib import log
    from it_device import Ctl
    log.configure(level="info", console=True)  # captured by pytest, shown on failure
    mod = importlib.import_module("it_" + name)
    try:
        result = asyncio.run(mod.main(Ctl(op.handle)))
    finally:
        op.finish()
    return {"result": result}


def _run_micropython(name: str, op: Operator, tmp_path: Path, timeout: float) -> dict:
    bundle, scripts = build_bundle()
    work = tmp_path / "mp"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, MICROPYPATH=f"{bundle}:{scripts}:.frozen", PICOIOT_FLASH=str(work / "flash"))
    proc = subprocess.Popen([paths.micropython_bin(), "-X", f"heapsize={HEAP}", "-m", "it_main", name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=work, env=env, bufsize=1)
    killer = threading.Timer(timeout, proc.kill)  # a hung scenario fails the test instead of hanging the suite
    killer.start()
    output: list[str] = []
    done = None
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            if line.startswith("@@ASK "):
                req = json.loads(line[6:])
                try:
                    answer = {"result": op.handle(req["op"], req["args"])}
                except BaseException as e:
                    op.failures.append(e)
                    answer = {"error": f"{type(e).__name__}: {e}"}
                proc.stdin.write(json.dumps(answer) + "\n")
                proc.stdin.flush()
            elif line.startswith("@@DONE "):
                done = json.loads(line[7:])
            else:
                output.append(line)
        proc.wait(10)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:  # the device went away first: nothing left to flush
                pass
    text = "".join(output)
    try:
        op.finish()
    except BaseException as e:
        raise AssertionError(f"operator side failed; device output:\n{text[-4000:]}") from e
    if done is None or proc.returncode != 0:
        raise AssertionError(f"micropython scenario {name} failed (exit {proc.returncode}):\n{text[-6000:]}")
    if op.key:
        assert op.key not in text, "the device key appeared in the device's output"
    done["output"] = text
    return done
