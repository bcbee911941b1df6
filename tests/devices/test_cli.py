"""`picoiot demo` and `picoiot sim` as a person runs them: real subprocesses, real signals, then real clients against
what they print and write."""
import json
import os
import re
import signal
import subprocess
import sys

import httpx
import ntplib
import pytest
from websockets.sync.client import connect

from devtest import HEAP, wait_until
from picoiot.procs import free_port
from picoiot.server.auth import device_local_token

PICOIOT = [sys.executable, "-m", "picoiot.cli"]
ENV = dict(os.environ, COLUMNS="250", NO_COLOR="1")


def _spawn(args, log):
    with open(log, "wb") as out:
        return subprocess.Popen(PICOIOT + [str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def _reap(proc):
    """After a failure: SIGTERM lets the command stop what it started; SIGKILL only if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _closed(url):
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_demo_comes_up_writes_demo_json_answers_and_stops_on_ctrl_c(tmp_path, bundle):
    data = tmp_path / "demo"
    log = tmp_path / "demo.out"
    proc = _spawn(["demo", "--data-dir", data, "--port", free_port(), "--duration", 300], log)
    try:
        wait_until(lambda: (data / "demo.json").exists() or proc.poll() is not None, 150, "demo.json")
        assert proc.poll() is None, log.read_text()
        info = json.loads((data / "demo.json").read_text())
        assert oct((data / "demo.json").stat().st_mode & 0o777) == "0o600"  # it holds tokens
        cp = info["control_plane_url"]
        devs = {d["kind"]: d for d in info["devices"]}
        assert set(devs) == {"relays", "sensors"}, info
        # demo.json is written just before the table is printed: wait for the output rather than race it
        wait_until(lambda: all(d["url"] in log.read_text() for d in info["devices"]), 30, "device URLs printed")
        # and it says how fast a cloud change gets to a relay, and who wins a disagreement
        wait_until(lambda: "cloud vs device" in log.read_text(), 30, "the cloud-vs-device note")
        note = " ".join(log.read_text().split())
        assert "tens of ms" in note and "the device wins" in note and "clears it from the shadow" in note, note
        assert all(d["runtime"] == "micropython" for d in info["devices"]), info["devices"]
        tokens = info["tokens"]
        assert set(tokens["control_plane"]) == {"viewer", "operator", "admin"}
        relays, sensors = devs["relays"], devs["sensors"]
        dtok = tokens["devices"]

        def h(tok):
            return {"Authorization": f"Bearer {tok}"}
        # the control plane sees both online
        listed = httpx.get(f"{cp}/api/v1/namespaces/default/devices", headers=h(tokens["control_plane"]["viewer"]),
                           timeout=10).json()["devices"]
        assert {d["device_id"]: d["online"] for d in listed} == {relays["id"]: True, sensors["id"]: True}
        # the device tokens work with their roles
        r = httpx.post(relays["url"] + "/gpio/relay1", json={"state": "on"}, headers=h(dtok[relays["id"]]["viewer"]))
        assert r.status_code == 403
        r = httpx.post(relays["url"] + "/gpio/relay1", json={"state": "on"},
                       headers=h(dtok[relays["id"]]["operator"]), timeout=10)
        assert r.status_code == 200 and r.json()["state"] == "on", r.text
        # through the control plane, as the printed example does
        r = httpx.post(f"{cp}/api/v1/namespaces/default/devices/{relays['id']}/shadows/default",
                       json={"state": {"desired": {"relay1": "off"}}}, headers=h(tokens["control_plane"]["operator"]),
                       timeout=10)
        assert r.status_code == 200, r.text

        def relay1():  # the demo keeps the default device rate limit (5/s): poll gently, a 429 is "not yet"
            r = httpx.get(relays["url"] + "/gpio/relay1", headers=h(dtok[relays["id"]]["viewer"]), timeout=10)
            return r.json()["state"] if r.status_code == 200 else None
        wait_until(lambda: relay1() == "off", 30, "desired relay1=off applied", interval=0.5)
        r = httpx.get(sensors["url"] + "/sensors", headers=h(dtok[sensors["id"]]["viewer"]), timeout=10)
        assert r.status_code == 200 and r.json()["values"], r.text
        ws_url = sensors["url"].replace("http://", "ws://") + "/ws?token=" + dtok[sensors["id"]]["viewer"]
        with connect(ws_url, open_timeout=10) as ws:
            frame = json.loads(ws.recv(timeout=10))
        assert "seq" in frame and frame["values"], frame
        env = (data / "demo.env").read_text()
        assert f"export RELAYS_OPERATOR={dtok[relays['id']]['operator']}" in env
        # Ctrl-C: it stops cleanly and takes every process with it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
        assert "stopped" in log.read_text()
        for url in [cp] + [d["url"] for d in info["devices"]]:
            assert _closed(url), f"{url} still answers after the demo stopped"
    finally:
        _reap(proc)


def _top_free_port() -> int:
    """The highest free TCP port from 65535 down: the SNTP port beside it (port + 123) and the devices' (port + 1,
    + 2) are then past the end of the range."""
    for port in range(65535, 65412, -1):
        if free_port(preferred=port) == port:
            return port
    pytest.skip("no free port in 65413..65535")


def test_demo_at_the_top_of_the_port_range_comes_up_and_serves(tmp_path):
    # `picoiot demo --port 65500` crashed with OverflowError: the SNTP port was port + 123
    port = _top_free_port()
    data = tmp_path / "demo"
    log = tmp_path / "demo.out"
    proc = _spawn(["demo", "--data-dir", data, "--port", port, "--runtime", "cpython", "--duration", 300], log)
    try:
        wait_until(lambda: (data / "demo.json").exists() or proc.poll() is not None, 150, "demo.json")
        assert proc.poll() is None, log.read_text()
        info = json.loads((data / "demo.json").read_text())
        assert info["control_plane_url"] == f"http://127.0.0.1:{port}", info
        sntp = int(re.search(r"SNTP on UDP (\d+)", log.read_text()).group(1))
        assert 0 < sntp <= 65535 and sntp != port + 123, sntp
        assert ntplib.NTPClient().request("127.0.0.1", port=sntp, version=4, timeout=5).stratum >= 1
        viewer = {"Authorization": f"Bearer {info['tokens']['control_plane']['viewer']}"}
        listed = httpx.get(f"http://127.0.0.1:{port}/api/v1/namespaces/default/devices", headers=viewer,
                           timeout=10).json()["devices"]
        assert {d["device_id"] for d in listed} == {d["id"] for d in info["devices"]}, listed
        for d in info["devices"]:
            assert httpx.get(d["url"] + "/health", timeout=10).status_code == 200, d
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        _reap(proc)


def test_sim_runs_devices_restarts_resets_and_stops_on_sigterm(tmp_path, cp, bundle):
    state = tmp_path / "sim"
    log = tmp_path / "sim.out"
    # no --heap: the default must be enough (it was 192K, where a relays device fails with MemoryError)
    proc = _spawn(["sim", "--kind", "relays", "--count", 2, "--server", cp.url, "--data-dir", cp.data_dir,
                   "--state-dir", state, "--base-port", free_port(), "--prefix", "simt"], log)
    try:
        wait_until(lambda: len(re.findall(r"simt-\d +http://\S+ +ready", log.read_text())) == 2
                   or proc.poll() is not None, 120, "two devices ready")
        assert proc.poll() is None, log.read_text()
        urls = dict(re.findall(r"(simt-\d) +(http://\S+) +ready", log.read_text()))
        for dev in urls:
            wait_until(lambda: cp.device(dev)["online"], 30, f"{dev} online")
        assert cp.device("simt-1")["device_type"] == "relays"
        key = json.loads((state / "simt-1.key.json").read_text())["device_key"]
        admin = {"Authorization": f"Bearer {device_local_token(key, 'simt-1', 'admin', 300)}"}
        assert httpx.post(urls["simt-1"] + "/gpio/relay1", json={"state": "on"}, headers=admin).status_code == 200
        assert httpx.post(urls["simt-1"] + "/reboot", headers=admin).status_code == 202
        wait_until(lambda: "simt-1: simulated reset, started again" in log.read_text(), 30, "the reset reported")

        def info():
            try:
                r = httpx.get(urls["simt-1"] + "/info", headers=admin, timeout=5)
            except httpx.TransportError:
                return None
            return r.json() if r.status_code == 200 else None
        assert wait_until(info, 60, "simt-1 back")["reset_cause"] == "hard"
        assert (state / "simt-1.flash").is_dir() and (state / "simt-2.flash").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert "stopped 2 device(s)" in log.read_text()
        for url in urls.values():
            assert _closed(url)
    finally:
        _reap(proc)


def test_sim_duration_stops_by_itself(tmp_path, cp, bundle):
    log = tmp_path / "sim.out"
    port = free_port()
    proc = _spawn(["sim", "--kind", "relays", "--server", cp.url, "--data-dir", cp.data_dir, "--state-dir",
                   tmp_path / "sim", "--heap", HEAP["relays"], "--base-port", port, "--prefix", "simd",
                   "--duration", 2], log)
    try:
        assert proc.wait(120) == 0, log.read_text()
    finally:
        _reap(proc)
    out = log.read_text()
    assert "simd-1" in out and "ready" in out and "running for 2 s" in out and "stopped 1 device(s)" in out, out
    assert _closed(f"http://127.0.0.1:{port}")


def _run(*args, env=None):
    """A `picoiot` command in-process (Typer's runner runs the real command code without an interpreter start)."""
    from typer.testing import CliRunner

    from picoiot.cli import app
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


@pytest.mark.parametrize("args,status,message", [
    (["--kind", "lamps"], 2, "--kind must be relays or sensors"),
    (["--kind", "relays", "--runtime", "jvm"], 2, "--runtime must be one of"),
    (["--kind", "relays", "--heap", "lots"], 2, "--heap 'lots'"),
])
def test_sim_refuses_bad_options(args, status, message, tmp_path):
    code, out = _run("sim", "--state-dir", tmp_path, *args)
    assert code == status and message in out, (code, out)


def test_sim_without_credentials_or_server_says_why(tmp_path, cp):
    env = {"PICOIOT_TOKEN": None, "PICOIOT_DATA_DIR": None, "COLUMNS": "250"}
    code, out = _run("sim", "--kind", "relays", "--server", cp.url, "--state-dir", tmp_path, "--runtime", "cpython",
                     env=env)
    assert code == 1 and "admin token" in out, out
    dead = f"http://127.0.0.1:{free_port()}"
    code, out = _run("sim", "--kind", "relays", "--server", dead, "--state-dir", tmp_path, "--runtime", "cpython",
                     env=env)
    assert code == 1 and f"no control plane at {dead}" in out, out
    assert not list(tmp_path.glob("*.json")), "nothing enrolled or written on failure"
