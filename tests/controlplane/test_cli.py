"""The `picoiot` commands as a person runs them: server (subprocess, real signals), provision, token, client commands;
and a restart test — kill -9 the server, start it again, nothing acknowledged is lost."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest

from cptest import PG_URL, drop_schema, new_schema, require_pg, sign

PICOIOT = [sys.executable, "-m", "picoiot.cli"]


class ServerProcess:
    def __init__(self, data_dir: Path, db_args: list[str], extra: list[str] = ()):
        self.proc = subprocess.Popen(PICOIOT + ["server", "--port", "0", "--data-dir", str(data_dir), *db_args,
                                                *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("picoiot server listening on http://127.0.0.1:"):
            self.proc.kill()
            raise AssertionError(f"unexpected first line {line!r}: {self.proc.stderr.read()}")
        self.url = line.split(" on ", 1)[1].strip()
        self.client = httpx.Client(base_url=self.url, timeout=20)

    def stop(self, sig=signal.SIGTERM) -> int:
        """Signal the server; returns its exit status and keeps what it printed in `.output`."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        self.output = out + err
        return self.proc.returncode


@pytest.fixture
def cli_env(backend, tmp_path):
    """(data_dir, db args) for the backend; PostgreSQL gets its own schema."""
    if backend == "postgres":
        schema = new_schema()
        yield tmp_path / "data", ["--db", PG_URL, "--db-schema", schema]
        drop_schema(schema)
    else:
        yield tmp_path / "data", []


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args, check=True):
    """A `picoiot` command in-process (Typer's runner: the real command code, without paying an interpreter start
    per call); the server itself always runs as a real subprocess."""
    from typer.testing import CliRunner

    from picoiot.cli import app
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    out = Result(r.exit_code, r.stdout, r.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"{args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def _register(client, key_file: dict, device_type="relays"):
    dev = key_file["device_id"]
    nonce = client.post("/api/devices/challenge", json={"device_id": dev}).json()["nonce"]
    r = client.post("/api/devices/register", json={"device_id": dev, "nonce": nonce, "device_type": device_type,
                                                   "signature": sign(key_file["device_key"], nonce, dev)})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_cli_end_to_end_and_restart_loses_nothing(cli_env, tmp_path):
    data, db = cli_env
    srv = ServerProcess(data, db)
    try:
        secrets_file = data / "secrets.json"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        secret_values = json.loads(secrets_file.read_text())
        # provision writes a 0600 key file pointing at the running server
        out = tmp_path / "relay-1.json"
        run("provision", "relay-1", "--type", "relays", "--out", str(out), "--data-dir", str(data), *db)
        assert out.stat().st_mode & 0o777 == 0o600
        key_file = json.loads(out.read_text())
        assert key_file["service_discovery_url"] == f"{srv.url}/api/devices"
        reg = _register(srv.client, key_file)
        h = {"Authorization": f"Bearer {reg['token']}"}
        c = srv.client
        assert c.post(reg["services"]["heartbeat"], headers=h, json={"seq": 1}).status_code == 200
        # operator actions through the CLI's client commands (token minted from the data dir)
        base = ["--data-dir", str(data), "--url", srv.url]
        r = run("config", "set", "relay-1", "failsafe_after_s=7", "log.level=debug", *base)
        assert srv.proc.poll() is None
        assert "config v2" in r.stdout
        r = run("config", "set", "relay-1", "relays.relay1.pin=99", *base, check=False)
        assert r.returncode == 2 and "relays.relay1.pin" in r.stderr
        r = run("state", "set", "relay-1", "relay1=on", *base)
        assert '"relay1": "on"' in r.stdout
        c.post(reg["services"]["state"], headers=h, json={"state": {"reported": {"relay1": "off"}}})
        batch = {"alarms": [{"key": "relay.stuck", "severity": "error", "message": "no feedback", "count": 3,
                             "first_ts": 1000, "last_ts": 3000},
                            {"key": "wifi.weak", "severity": "info", "count": 1, "first_ts": 1000, "last_ts": 1000}]}
        assert c.post(reg["services"]["alarms"], headers=h, json=batch).status_code == 200
        r = run("alarms", "list", "--json", *base)
        alarms = {a["key"]: a for a in json.loads(r.stdout)}
        run("alarms", "ack", str(alarms["relay.stuck"]["id"]), *base)
        r = run("devices", "list", *base)
        assert "relay-1" in r.stdout and "yes" in r.stdout
        admin = _admin(data, db)
        before = {
            "device": c.get("/api/v1/namespaces/default/devices/relay-1", headers=admin).json(),
            "config": c.get(reg["services"]["config"], headers=h).json(),
            "state": c.get(reg["services"]["state"], headers=h).json(),
            "alarms": c.get("/api/v1/namespaces/default/alarms", headers=admin).json(),
        }
    finally:
        # kill -9: no shutdown hook runs
        srv.stop(signal.SIGKILL)

    srv = ServerProcess(data, db)
    admin = _admin(data, db)
    try:
        c = srv.client
        assert json.loads((data / "secrets.json").read_text()) == secret_values  # same keys, not regenerated
        # the device's token from before the restart still works (same signing key)
        cfg = c.get(reg["services"]["config"].replace(reg["services"]["config"].split("/api")[0], srv.url),
                    headers=h)
        assert cfg.json() == before["config"]
        url = srv.url
        assert c.get(f"{url}/api/v1/namespaces/default/devices/relay-1/shadows/default", headers=h).json() \
            == before["state"]
        assert c.get("/api/v1/namespaces/default/alarms", headers=admin).json() == before["alarms"]
        dev = c.get("/api/v1/namespaces/default/devices/relay-1", headers=admin).json()
        assert dev["online"] is True and dev["config_version"] == 2
        assert dev["last_seen"] >= before["device"]["registered_ts"]
        # the device retries its last alarm batch after the restart: no duplicate, no double count
        assert c.post(f"{url}/api/v1/devices/relay-1/alarms", headers=h, json=batch).status_code == 200
        after = c.get("/api/v1/namespaces/default/alarms", headers=admin).json()["alarms"]
        stuck = next(a for a in after if a["key"] == "relay.stuck")
        assert len(after) == 2 and stuck["count"] == 3 and stuck["acked"] is True
    finally:
        assert srv.stop(signal.SIGTERM) == 0  # SIGTERM: a clean exit
    for secret in [secret_values["signing_key"], *secret_values["enrollment_keys"].values(), key_file["device_key"],
                   reg["token"]]:
        assert secret not in srv.output and secret not in (data / "server.json").read_text()



def _admin(data: Path, db: list[str]) -> dict:
    tok = run("token", "--role", "admin", "--data-dir", str(data), *db).stdout.strip()
    return {"Authorization": f"Bearer {tok}"}


def test_token_command(tmp_path):
    data = tmp_path / "d"
    # tokens are minted from a server's data directory (one without secrets is refused: test_first_hour); provision
    # makes one, as `picoiot server` would
    run("provision", "relay-1", "--type", "relays", "--data-dir", str(data))
    tok = run("token", "--role", "operator", "--namespace", "default", "--ttl", "60", "--data-dir", str(data)) \
        .stdout.strip()
    secrets = json.loads((data / "secrets.json").read_text())
    claims = jwt.decode(tok, secrets["signing_key"], algorithms=["HS256"])
    assert claims["role"] == "operator" and claims["ns"] == "default" and claims["exp"] - claims["iat"] == 60
    # a device-scoped token is signed with that device's key, for its local API
    key = json.loads(run("provision", "relay-2", "--data-dir", str(data)).stdout)["device_key"]
    dtok = run("token", "--role", "viewer", "--device", "relay-2", "--data-dir", str(data)).stdout.strip()
    claims = jwt.decode(dtok, key, algorithms=["HS256"], audience="relay-2")
    assert claims["role"] == "viewer" and claims["aud"] == "relay-2"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(dtok, secrets["signing_key"], algorithms=["HS256"], audience="relay-2")
    # an individually keyed device: the token uses its stored key
    ind = json.loads(run("provision", "solo", "--individual", "--data-dir", str(data)).stdout)["device_key"]
    stok = run("token", "--role", "admin", "--device", "solo", "--data-dir", str(data)).stdout.strip()
    assert jwt.decode(stok, ind, algorithms=["HS256"], audience="solo")["role"] == "admin"
    # bad input: clear message, exit 2
    r = run("token", "--role", "god", "--data-dir", str(data), check=False)
    assert r.returncode == 2 and "role must be one of" in r.stderr
    r = run("token", "--role", "admin", "--namespace", "nope", "--data-dir", str(data), check=False)
    assert r.returncode == 2 and "unknown namespace" in r.stderr
    r = run("provision", "relay-1", "--data-dir", str(data), check=False)
    assert r.returncode == 2 and "device exists" in r.stderr
    r = run("provision", "bad id", "--data-dir", str(data), check=False)
    assert r.returncode == 2


def test_client_commands_report_an_unreachable_server(tmp_path):
    r = run("devices", "list", "--url", "http://127.0.0.1:9", "--token", "any", check=False)
    assert r.returncode == 2 and "cannot reach the server" in r.stderr


# every remote command: one with a device argument, and each listing (which needs none to succeed)
REMOTE = [("devices", "show", "r1"), ("config", "show", "r1"), ("state", "show", "r1"), ("alarms", "ack", "1"),
          ("ota", "assign", "1.0", "--device", "r1")]
LISTINGS = [("devices", "list"), ("alarms", "list"), ("ota", "status"), ("ota", "rollout", "status")]


def test_every_remote_command_takes_the_same_options_and_fails_the_same_way(tmp_path):
    from typer.testing import CliRunner

    from picoiot.cli import app
    from cptest import LiveServer, make_settings
    srv = LiveServer(make_settings("sqlite", tmp_path))

    def env_run(cmd, **env):
        r = CliRunner().invoke(app, list(cmd), env={"PICOIOT_URL": None, "PICOIOT_TOKEN": None,
                                                     "PICOIOT_DATA_DIR": None, **env})
        return Result(r.exit_code, r.stdout, r.stderr)
    try:
        for cmd in REMOTE + LISTINGS:
            for r in (run(*cmd, "--url", "http://127.0.0.1:9", "--token", "any", check=False),
                      env_run(cmd, PICOIOT_URL="http://127.0.0.1:9", PICOIOT_TOKEN="any")):
                assert r.returncode == 2 and r.stderr.count("\n") == 1, (cmd, r.stderr)
                assert r.stderr.startswith("error: cannot reach the server at http://127.0.0.1:9: "), (cmd, r.stderr)
            r = env_run(cmd, PICOIOT_URL=srv.url, PICOIOT_TOKEN="forged")
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and " 401 " in r.stderr, (cmd, r.stderr)
            assert "did not accept the token" in r.stderr, (cmd, r.stderr)
            r = run(*cmd, "--url", srv.url, "--token", srv.token("admin"), check=False)
            assert r.returncode == 2 and " 404 " in r.stderr if cmd in REMOTE else r.returncode == 0, (cmd, r.stderr)
        # without a token: minted with the signing key of --data-dir (or $PICOIOT_DATA_DIR), for the server it names
        for cmd in LISTINGS:
            assert run(*cmd, "--server", srv.url, "--data-dir", tmp_path).returncode == 0
            assert env_run(cmd, PICOIOT_URL=srv.url, PICOIOT_DATA_DIR=str(tmp_path)).returncode == 0
            r = env_run(cmd, PICOIOT_URL=srv.url, PICOIOT_DATA_DIR=str(tmp_path / "none"))
            assert r.returncode == 2 and r.stderr.startswith("error: no token: pass --token"), (cmd, r.stderr)
    finally:
        srv.stop()


def test_sntp_port_serves_time_and_is_advertised(tmp_path):
    import socket
    import struct
    srv = ServerProcess(tmp_path / "d", [], ["--sntp-port", "0"])
    try:
        key = json.loads(run("provision", "relay-1", "--data-dir", str(tmp_path / "d")).stdout)
        ntp = _register(srv.client, key)["services"]["ntp"]
        host, port = ntp.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(b"\x23" + b"\0" * 47, (host, int(port)))  # LI 0, version 4, mode 3 (client)
            reply, _ = sock.recvfrom(512)
        assert len(reply) >= 48 and reply[0] & 0x7 == 4  # mode 4: server
        assert struct.unpack("!I", reply[40:44])[0] > 0  # a transmit timestamp
        # a namespace created by `provision` while the server runs is usable at once
        lab = json.loads(run("provision", "lab-1", "--namespace", "lab", "--data-dir", str(tmp_path / "d")).stdout)
        c = srv.client
        nonce = c.post("/api/devices/challenge", json={"device_id": "lab-1", "namespace": "lab"}).json()["nonce"]
        r = c.post("/api/devices/register", json={"device_id": "lab-1", "nonce": nonce,
                                                   "signature": sign(lab["device_key"], nonce, "lab-1")})
        assert r.status_code == 200 and r.json()["namespace"] == "lab"
    finally:
        assert srv.stop() == 0


def test_ttl_slack_sets_the_ttl_devices_get_and_is_validated(tmp_path):
    srv = ServerProcess(tmp_path / "d", [], ["--ttl-slack", "100"])
    try:
        key = json.loads(run("provision", "relay-1", "--data-dir", str(tmp_path / "d")).stdout)
        intervals = _register(srv.client, key)["intervals"]
        assert intervals["ttl"] == intervals["heartbeat"] * 3 + 100
    finally:
        assert srv.stop() == 0
    bad = subprocess.run(PICOIOT + ["server", "--port", "0", "--data-dir", str(tmp_path / "e"), "--ttl-slack", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--ttl-slack" in bad.stderr + bad.stdout


def test_max_registrations_bounds_registrations_in_flight_and_is_validated(tmp_path):
    srv = ServerProcess(tmp_path / "d", [], ["--max-registrations", "0"])  # 0: every registration is told to retry
    try:
        r = srv.client.post("/api/devices/challenge", json={"device_id": "relay-1", "namespace": "default"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"] == {"limit": "registrations", "max": 0}
        assert srv.client.get("/health").status_code == 200  # nothing else is refused
    finally:
        assert srv.stop() == 0
    bad = subprocess.run(PICOIOT + ["server", "--port", "0", "--data-dir", str(tmp_path / "e"),
                                    "--max-registrations", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--max-registrations" in bad.stderr + bad.stdout
