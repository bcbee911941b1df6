"""Push over the one connection (docs/protocol.md §5): the device holds its heartbeat as a long-poll, so a desired
state or config change reaches it without waiting for a heartbeat. The device here heartbeats once an hour (the
largest interval): its next heartbeat, config poll (60 s) and shadow resync (300 s) are all far beyond the time these
waits allow, so only the long-poll can deliver the changes in time."""
import pytest

from devtest import wait_until

HOURLY = {"heartbeat_interval_s": 3600, "relays": {"lamp": {"pin": 8}}}


@pytest.fixture(scope="module")
def dev(device_factory):
    return device_factory("relays", HOURLY, name="push")


def _lamp(dev):
    return dev.get("/gpio/lamp").json()["state"]


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


def test_a_flood_of_desired_changes_ends_at_the_newest(dev, cp):
    with cp.api("operator") as c:
        for i in range(30):
            r = c.post(f"/api/v1/namespaces/default/devices/{dev.id}/shadows/default",
                       json={"state": {"desired": {"lamp": "on" if i % 2 else "off"}}})
            assert r.status_code == 200, r.text
    # the last write was "on"
    def settled():
        st = cp.shadow(dev.id)["state"]
        return _lamp(dev) == "on" and st["reported"].get("lamp") == "on" and "lamp" not in st["delta"]
    wait_until(settled, 30, "the device to apply and report the newest desired value")


def test_a_change_made_while_the_server_restarts_is_not_lost(dev, cp):
    cp.stop()
    cp.start()
    cp.desire(dev.id, {"lamp": "off"})
    wait_until(lambda: _lamp(dev) == "off", 60, "the change written after the restart to reach the device")
    # and the push works again afterwards
    cp.desire(dev.id, {"lamp": "on"})
    wait_until(lambda: _lamp(dev) == "on", 60, "a later change")
