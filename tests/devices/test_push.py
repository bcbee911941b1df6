"""Push over the one connection (docs/protocol.md §5): the device holds its heartbeat as a long-poll, so a desired
state or config change reaches it without waiting for a heartbeat. The device here heartbeats once an hour (the
largest interval): its next heartbeat, config poll (60 s) and shadow resync (300 s) are all far beyond the time these
waits allow, so only the long-poll can deliver the changes in time."""
import os
import signal

import pytest

from devtest import wait_until
from picoiot.procs import DEFAULT_HEAP

HOURLY = {"heartbeat_interval_s": 3600, "relays": {"lamp": {"pin": 8}}}


@pytest.fixture(scope="module")
def dev(device_factory):
    return device_factory("relays", HOURLY, name="push", pinlog=True)


def _lamp(dev):
    return dev.get("/gpio/lamp").json()["state"]


def _lamp_switches(dev):
    log = dev.pinlog()
    assert log["dropped"] == 0
    levels = [lv for _, pin, lv in log["events"] if pin == HOURLY["relays"]["lamp"]["pin"]]
    return sum(1 for a, b in zip(levels, levels[1:]) if a != b)


def _info(dev):
    return dev.get("/info").json()


def test_a_desired_change_is_pushed_to_the_device(dev, cp):
    for state in ("on", "off", "on"):
        cp.desire(dev.id, {"lamp": state})
        wait_until(lambda: _lamp(dev) == state, 20, f"desired lamp={state} to reach the device")


def test_a_config_change_is_pushed_to_the_device(dev, cp):
    before = _info(dev)["config_version"]
    v = cp.patch_config(dev.id, {"log": {"level": "debug"}})
    assert v > before
    wait_until(lambda: _info(dev)["config_version"] == v, 20, f"config v{v} to reach the device")


def test_a_flood_of_desired_changes_is_coalesced_to_the_newest(dev, cp):
    last = "off" if _lamp(dev) == "on" else "on"
    before = _lamp_switches(dev)
    # the device is frozen while the writes land (it can neither fetch nor switch): what it finds when it runs again is
    # 30 versions newer than what it knows, and it must act on the newest document, not replay the writes
    os.kill(dev.child.pid, signal.SIGSTOP)
    try:
        with cp.api("operator") as c:
            for i in range(30):
                v = last if i % 2 else ("on" if last == "off" else "off")
                r = c.post(f"/api/v1/namespaces/default/devices/{dev.id}/shadows/default",
                           json={"state": {"desired": {"lamp": v}}})
                assert r.status_code == 200, r.text
    finally:
        os.kill(dev.child.pid, signal.SIGCONT)

    def settled():
        st = cp.shadow(dev.id)["state"]
        return _lamp(dev) == last and st["reported"].get("lamp") == last and "lamp" not in st["delta"]
    wait_until(settled, 30, "the device to apply and report the newest desired value")
    # pinlog.json is written every 100 ms: the API can show the switch before the file does
    wait_until(lambda: _lamp_switches(dev) > before, 10, "the pin log to show the switch")
    assert _lamp_switches(dev) == before + 1, "one switch, to the newest value"


def test_a_change_made_while_the_server_restarts_is_not_lost(dev, cp):
    cp.stop()
    cp.start()
    cp.desire(dev.id, {"lamp": "off"})
    wait_until(lambda: _lamp(dev) == "off", 60, "the change written after the restart to reach the device")
    # and the push works again afterwards
    cp.desire(dev.id, {"lamp": "on"})
    wait_until(lambda: _lamp(dev) == "on", 60, "a later change")


def test_an_ota_assignment_is_pushed_to_the_device(device_factory, cp, tmp_path):
    import json

    from devtest import NS
    from picoiot import ota_cli
    key = tmp_path / "ota.key"
    pub = ota_cli.keygen(key)
    ota_cli.set_key(cp.url, cp.token(), NS, pub)
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "release.txt").write_text("pushed\n")
    ota_cli.publish(cp.url, cp.token(), NS, rel, "9.0+push", key)  # a "+" must survive the device's query string
    d = device_factory("relays", HOURLY, name="ota", start=False)
    s = json.loads(d.child.settings.read_text())
    s["ota_public_key"] = pub
    d.child.settings.write_text(json.dumps(s))
    d.child.heap = os.environ.get("PICOIOT_TEST_HEAP_OTA", DEFAULT_HEAP["relays"])  # an update boot needs no more
    d.child.start()
    d.child.wait_ready(90)

    def seq():
        return (cp.device(d.id).get("heartbeat") or {}).get("seq", -1)
    # its first heartbeat, just begun: the server holds it for up to a minute, so only a wake-up delivers the offer in
    # time (and its OTA task checked at boot, before the assignment)
    wait_until(lambda: seq() >= 0, 60, "the device's first heartbeat")
    ota_cli.assign(cp.url, cp.token(), NS, "9.0+push", d.id, None)
    wait_until(lambda: b'"ota update' in d.child.log.read_bytes(), 20, "the device to act on the offer")
    assert b"9.0+push" in d.child.log.read_bytes()
