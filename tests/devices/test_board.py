"""From a new (simulated) Pico W to a running device, the way a user goes: `picoiot server --tls-cert/--tls-key`,
`picoiot provision --board-settings --ca`, `picoiot deploy --dry-run`, the plan's files copied into a flash directory,
the board's main.py booting from that directory under the unix micropython (its RTC at 2021 like an rp2's), then
registration over HTTPS, a desired relay state applied and the device's alarm dated right on the server.
Then what a bad certificate does: a clear log line, degraded mode, the local API still serving."""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trustme

from devtest import BUNDLE, HEAP, RUNTIME, wait_until
from picoiot.deploy import stage_bundle
from picoiot.procs import DeviceChild, ServerChild, free_port
from picoiot.server.auth import issue_token
from picoiot.server.settings import Settings

pytestmark = pytest.mark.skipif(RUNTIME != "micropython", reason="the board's main.py runs under the unix port")
CLI = [sys.executable, "-m", "picoiot.cli"]
PORT = "/dev/ttyACM0"  # only printed: --dry-run touches no board


class TLSServer(ServerChild):
    """`picoiot server` serving HTTPS with a certificate from a trustme CA."""

    def __init__(self, data_dir: Path, ca: trustme.CA, leaf):
        d = data_dir / "tls"
        d.mkdir(parents=True)
        leaf.private_key_pem.write_to_path(d / "key.pem")
        leaf.cert_chain_pems[0].write_to_path(d / "cert.pem")
        super().__init__(data_dir, extra=("--tls-cert", str(d / "cert.pem"), "--tls-key", str(d / "key.pem"),
                                          "--sweep-interval", "0.2", "--heartbeat-flush", "0.2"))
        self.url = self.url.replace("http://", "https://")
        self.ctx = ssl.create_default_context()
        ca.configure_trust(self.ctx)

    def argv(self) -> list[str]:
        return [a for a in super().argv() if a not in ("--sntp-port", str(self.sntp_port))]  # no SNTP: see the test

    def start(self, timeout_s: float = 30, verify: bool = True) -> "TLSServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super(ServerChild, self).start()
        wait_until(lambda: self._healthy(verify), timeout_s, "picoiot server over HTTPS")
        return self

    def _healthy(self, verify: bool) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        try:
            return httpx.get(self.url + "/health", verify=self.ctx if verify else False,
                             timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def call(self, method: str, path: str, role: str = "admin", **kw):
        tok = issue_token(Settings.from_data_dir(self.data_dir).secrets.signing_key, f"test-{role}", "default", role,
                          600)
        r = httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {tok}"}, verify=self.ctx,
                          timeout=20, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()


@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    return ca, ca.issue_cert("127.0.0.1")  # an IP SAN only: "localhost" is the wrong name


@pytest.fixture(scope="module")
def tls_cp(pki, tmp_path_factory):
    s = TLSServer(tmp_path_factory.mktemp("cp-tls"), *pki)
    try:
        yield s.start()
    finally:
        s.stop()


def provision(cp: ServerChild, dev: str, out: Path, ca_pem: Path | None) -> tuple[dict, str]:
    """`picoiot provision … --board-settings` → (the settings file, the operator API token it printed once)."""
    p = subprocess.run(CLI + ["provision", dev, "--data-dir", str(cp.data_dir), "--kind", "relays",
                              "--board-settings", str(out), "--wifi-ssid", "sim-ap", "--wifi-password", "sim-password",
                              "--api-token", "operator"] + (["--ca", str(ca_pem)] if ca_pem else []),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    token = p.stderr.split("operator API token (shown once, only its hash is stored): ")[1].split()[0]
    return json.loads(out.read_text()), token


def for_the_simulator(settings: Path, **extra) -> None:
    """What a board gets from its WLAN, the simulator gets from the settings: the local API on 127.0.0.1 and a free
    port. SNTP goes to a closed port, so the clock comes from the registration answer alone."""
    doc = json.loads(settings.read_text())
    doc.update(host="127.0.0.1", port=free_port(), **extra)
    cfg = doc.setdefault("controller", {}).setdefault("config", {})
    cfg["time"] = {"servers": [f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"]}
    cfg["heartbeat_interval_s"] = 1
    settings.write_text(json.dumps(doc))


def boot(flash: Path, log: Path) -> DeviceChild:
    """The board's main.py from the flash directory, as a Pico W runs /main.py (the .mpy beside it on the path)."""
    return DeviceChild(flash / "settings.json", runtime="micropython", heap=HEAP["relays"], bundle=flash, log=log,
                       entry="main").start()


def test_new_board_to_running_device_over_https(tls_cp, pki, tmp_path):
    ca, _ = pki
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    settings = tmp_path / "board-1.json"
    doc, op_token = provision(tls_cp, "board-1", settings, ca_pem)
    assert settings.stat().st_mode & 0o777 == 0o600
    assert doc["service_discovery_url"] == tls_cp.url + "/api/devices"
    assert doc["kind"] == "relays" and doc["wifi"] == [{"ssid": "sim-ap", "password": "sim-password"}]
    assert "BEGIN" not in doc["ca"] and ssl.DER_cert_to_PEM_cert(__import__("base64").b64decode(doc["ca"])).strip() \
        == ca.cert_pem.bytes().decode().strip()
    for_the_simulator(settings)

    plan = subprocess.run(CLI + ["deploy", "--port", PORT, "--settings", str(settings), "--dry-run",
                                 "--build-dir", str(tmp_path / "build")], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    cmds = [shlex.split(ln) for ln in plan.stdout.splitlines() if ln.startswith("mpremote ")]
    assert all(c[:3] == ["mpremote", "connect", PORT] for c in cmds), plan.stdout
    assert cmds[0][3] == "exec" and cmds[-1][3:] == ["reset"]
    flash = tmp_path / "flash"
    flash.mkdir()
    copied = []
    for c in cmds:  # the simulated flash gets exactly what the plan's `fs cp` commands copy
        if c[3:5] != ["fs", "cp"]:
            continue
        args = [a for a in c[5:] if a != "-r"]
        *sources, dest = args
        assert dest.startswith(":")
        for src in map(Path, sources):
            target = flash / (dest[1:] if len(sources) == 1 and dest != ":" else src.name)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, target)
            copied.append(target.name)
    assert {"main.py", "settings.json", "iotlib", "relays_controller.mpy"} <= set(copied), copied
    assert "microdot" not in copied
    assert "sensors_controller.mpy" not in copied and "main_sim.mpy" not in copied and "picosim" not in copied
    # the simulated board stands in for the machine/network modules a Pico W has built in
    shutil.copytree(tmp_path / "build" / "firmware" / "picosim", flash / "picosim")

    dev = boot(flash, tmp_path / "board-1.log")
    try:
        with httpx.Client(base_url=dev.url, headers={"Authorization": f"Bearer {op_token}"}, timeout=10) as api:
            # registration over HTTPS, with the reset cause and the address the (simulated) WLAN has
            rec = wait_until(lambda: (lambda d: d if d.get("online") else None)(
                tls_cp.call("GET", "/api/v1/namespaces/default/devices/board-1", "viewer")), 60, "registration")
            assert rec["reset_cause"] == "power_on"
            assert rec["address"] == f"http://192.168.4.23:{dev.port}"
            # a desired relay state, through the control plane, applied on the device
            tls_cp.call("POST", "/api/v1/namespaces/default/devices/board-1/shadows/default", "operator",
                        json={"state": {"desired": {"relay1": "on"}}})
            wait_until(lambda: {r["name"]: r["state"] for r in api.get("/gpio").json()["relays"]}.get("relay1") == "on",
                       30, "relay1 on")
            # the RTC started at 2021: the device's alarm (SNTP fails here) must carry today's date on the server
            alarm = wait_until(lambda: [a for a in tls_cp.call("GET", "/api/v1/namespaces/default/alarms", "viewer")
                                        ["alarms"] if a["device_id"] == "board-1" and a["key"] == "timesync.failed"],
                               60, "the device's timesync.failed alarm")[0]
            now = time.time() * 1000
            assert abs(alarm["first_ts"] - now) < 120_000, (alarm, now)
            # ... and reported back through the state service, over HTTPS
            wait_until(lambda: (tls_cp.call("GET", "/api/v1/namespaces/default/devices/board-1/shadows/default",
                                            "viewer")["state"].get("reported") or {}).get("relay1") == "on",
                       30, "relay1 reported on", interval=0.5)
            info = api.get("/info").json()
            assert info["registered"] is True and info["degraded"] is False and info["time_synced"] is False
            assert info["config_version"] >= 1  # the config fetched over HTTPS
            assert "sim-password" not in json.dumps(info) and doc["device_key"] not in json.dumps(info)
    finally:
        dev.stop()
    lines = [json.loads(ln) for ln in dev.log.read_text().splitlines() if ln.startswith("{")]
    assert lines[0]["ts"] is None and "up_ms" in lines[0]  # before the first sync: marked, not dated 2021
    synced = [ln["ts"] for ln in lines if ln["ts"] is not None]
    assert synced and all(abs(ts - now) < 300_000 for ts in synced)
    text = dev.log.read_text()
    assert "sim-password" not in text and doc["device_key"] not in text and op_token not in text


@pytest.mark.parametrize("case", ["wrong_ca", "wrong_host", "expired"])
def test_bad_server_certificate_is_refused_and_the_device_keeps_serving(case, tls_cp, pki, tmp_path):
    ca, _ = pki
    ca_pem = tmp_path / "ca.pem"
    (trustme.CA() if case == "wrong_ca" else ca).cert_pem.write_to_path(ca_pem)
    server = tls_cp
    if case == "expired":
        now = datetime.datetime.now(datetime.timezone.utc)
        leaf = ca.issue_cert("127.0.0.1", not_before=now - datetime.timedelta(days=30),
                             not_after=now - datetime.timedelta(days=1))
        server = TLSServer(tmp_path / "cp-expired", ca, leaf)
        server.ctx.check_hostname = False  # the operator's calls below; the device is what must refuse it
        server.ctx.verify_mode = ssl.CERT_NONE
        server.start(verify=False)
    try:
        settings = tmp_path / "settings.json"
        dev_id = f"bad-cert-{case.replace('_', '-')}"
        doc, op_token = provision(server, dev_id, settings, ca_pem)
        url = doc["service_discovery_url"]
        for_the_simulator(settings, **({"service_discovery_url": url.replace("127.0.0.1", "localhost")}
                                       if case == "wrong_host" else {}))
        flash = stage_bundle("relays", tmp_path / "flash", cache=BUNDLE, simulator=True)
        shutil.copy(settings, flash / "settings.json")
        dev = boot(flash, tmp_path / "dev.log")
        try:
            line = wait_until(lambda: [ln for ln in dev.log.read_text().splitlines()
                                       if "control plane unreachable" in ln], 60, "the refusal in the log")[0]
            assert "TLS" in line, line
            with httpx.Client(base_url=dev.url, headers={"Authorization": f"Bearer {op_token}"}, timeout=10) as api:
                info = wait_until(lambda: _info(api), 30, "the local API", interval=0.5)
                assert info["registered"] is False and info["degraded"] is True
                assert api.post("/gpio/relay1", json={"state": "on"}).status_code == 200
        finally:
            dev.stop()
    finally:
        if server is not tls_cp:
            server.stop()


def _info(api: httpx.Client):
    try:
        r = api.get("/info")
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


def test_a_stalled_control_plane_puts_the_device_in_degraded_mode(tmp_path):
    """SIGSTOP: the kernel still accepts the device's connections, nothing answers. Heartbeats time out (2 s here, the
    settings' short HTTP timeout), and /info and /ready must say degraded within seconds, not after the next config
    poll; after SIGCONT the next heartbeat clears it."""
    cp = ServerChild(tmp_path / "cp", extra=("--sweep-interval", "0.2", "--heartbeat-flush", "0.2")).start()
    dev = None
    try:
        settings = tmp_path / "settings.json"
        _, op_token = provision(cp, "stalled-cp", settings, None)
        for_the_simulator(settings, sim={"http_timeout_ms": 2000, "http_connect_timeout_ms": 2000})
        flash = stage_bundle("relays", tmp_path / "flash", cache=BUNDLE, simulator=True)
        shutil.copy(settings, flash / "settings.json")
        dev = boot(flash, tmp_path / "dev.log")
        with httpx.Client(base_url=dev.url, headers={"Authorization": f"Bearer {op_token}"}, timeout=10) as api:
            wait_until(lambda: (lambda i: i and i["registered"] and not i["degraded"])(_info(api)), 60, "registered",
                       interval=0.5)  # the local API's rate limit: 5/s
            os.kill(cp.pid, signal.SIGSTOP)
            try:
                info = wait_until(lambda: (lambda i: i if i and i["degraded"] else None)(_info(api)), 20,
                                  "degraded while the control plane is stopped", interval=0.5)
                assert info["registered"] is True  # still registered: only the answers are missing
                ready = api.get("/ready").json()
                assert ready.get("degraded") is True or ready.get("checks", {}).get("degraded") is True, ready
            finally:
                os.kill(cp.pid, signal.SIGCONT)
            wait_until(lambda: (lambda i: i and not i["degraded"])(_info(api)), 30, "degraded cleared after SIGCONT",
                       interval=0.5)
            assert "heartbeat" in dev.log.read_text().split("degraded mode")[1].split("\n")[0]
    finally:
        if dev is not None:
            dev.stop()
        cp.stop()


@pytest.mark.parametrize("bad, field", [
    ({"controller": {"relay_pins": {"pump": 23}}}, "controller.relay_pins.pump cannot be GPIO23"),
    ({"kind": "lamp"}, "kind must be relays or sensors"),
    ({"device_key": None}, "device_key is missing"),
    ({"wifi": "home"}, "wifi must be a list"),
])
def test_bad_settings_leave_the_board_idle_with_the_field_named(bad, field, tmp_path):
    doc = {"version": 1, "kind": "relays", "device_id": "idle-1", "device_key": "k" * 64,
           "service_discovery_url": "http://127.0.0.1:9/api/devices", "wifi": [{"ssid": "home", "password": "pw-12345"}]}
    doc.update(bad)
    doc = {k: v for k, v in doc.items() if v is not None}
    flash = stage_bundle("relays", tmp_path / "flash", cache=BUNDLE, simulator=True)
    (flash / "settings.json").write_text(json.dumps(doc))
    dev = boot(flash, tmp_path / "dev.log")
    rc = wait_until(lambda: dev.poll(), 30, "main.py to give up")
    assert rc == 78  # EX_CONFIG: idle, not a crash and not a reset (the launcher would restart a reset)
    console = dev.log.read_text()
    assert f"picoiot: settings: {field}" in console and "REPL reachable" in console, console
    assert "Traceback" not in console and dev.restarts == 0
    logged = [json.loads(ln) for ln in (flash / "log" / "device.log").read_text().splitlines()]
    assert logged[-1]["msg"] == "settings unusable: idle" and logged[-1]["reason"].startswith(field)
    assert "pw-12345" not in console and "k" * 64 not in console


def test_picoiot_sim_runs_the_boards_main_from_a_settings_file(tmp_path):
    cp = ServerChild(tmp_path / "cp").start()
    try:
        settings = tmp_path / "sim-board.json"
        provision(cp, "sim-board", settings, None)
        p = subprocess.run(CLI + ["sim", "--settings", str(settings), "--heap", HEAP["relays"], "--duration", "1",
                                  "--state-dir", str(tmp_path / "state"), "--ready-timeout", "60"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "sim-board" in p.stdout and "ready" in p.stdout
        log = (tmp_path / "state" / "logs" / "sim-board.log").read_text()
        assert "picoiot: starting sim-board" in log and '"msg":"registered"' in log  # main.py, not main_sim
        rec = httpx.get(f"{cp.url}/api/v1/namespaces/default/devices/sim-board", headers={
            "Authorization": "Bearer " + issue_token(Settings.from_data_dir(cp.data_dir).secrets.signing_key, "t",
                                                     "default", "viewer", 60)}).json()
        assert rec["device_type"] == "relays" and rec["reset_cause"] == "power_on"
    finally:
        cp.stop()
