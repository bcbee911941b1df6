"""Across resets and outages: relay power-on modes after `POST /reboot` (a simulated reset: the process exits 75 and is
started again with the same flash) and after a power cut (kill -9, start again); the control plane stopped and
started again → the device keeps serving locally, recovers, and resyncs full documents."""
import pytest

from devtest import wait_until

POWER_ON = {"relays": {"relay1": {"power_on": "restore"}, "relay2": {"power_on": "on"}}}


@pytest.fixture(scope="module")
def relays(device_factory):
    return device_factory("relays", POWER_ON)


def test_power_on_modes_across_reboot_and_power_cut(relays):
    # the first boot ran on the built-in config (power_on off); the control plane's config arrived after power-on
    gpio = {r["name"]: r["power_on"] for r in relays.get("/gpio").json()["relays"]}
    assert gpio == {"relay1": "restore", "relay2": "on"}, gpio
    assert relays.post("/gpio/relay1", json={"state": "on"}).status_code == 200
    assert relays.post("/gpio/relay2", json={"state": "off"}).status_code == 200

    assert relays.post("/reboot", role="viewer").status_code == 403
    assert relays.post("/reboot", role="operator").status_code == 403
    assert relays.child.restarts == 0 and relays.child.running()
    r = relays.post("/reboot", role="admin")
    assert r.status_code == 202, r.text
    relays.wait_restarted(1)
    assert relays.child.exit_status is None and relays.child.restarts == 1
    info = relays.info()
    assert info["reset_cause"] == "hard", info
    assert relays.relays() == {"relay1": "on", "relay2": "on"}, "restore kept relay1 on; relay2 powers on on"

    assert relays.post("/gpio/relay1", json={"state": "off"}).status_code == 200
    relays.child.kill()  # a power cut: no chance to persist anything more
    relays.start()
    assert relays.info()["reset_cause"] == "power_on"
    assert relays.relays() == {"relay1": "off", "relay2": "on"}


def test_control_plane_restart_device_recovers_and_resyncs(relays, cp):
    wait_until(lambda: cp.device(relays.id)["online"], 30, "the device online")
    cp.stop()
    try:
        wait_until(lambda: relays.info()["degraded"], 30, "the device to notice the control plane is gone")
        # degraded: the local API keeps serving on the last-known-good config, and switching still works
        assert relays.post("/gpio/relay1", json={"state": "on"}).status_code == 200
        assert relays.relays()["relay1"] == "on"
        assert relays.get("/health", role=None).status_code == 200
    finally:
        cp.start()
    wait_until(lambda: not relays.info()["degraded"], 60, "the device to reach the control plane again")
    wait_until(lambda: cp.device(relays.id)["online"], 30, "the device online again")
    # the change made while the control plane was away is reported in full
    wait_until(lambda: cp.shadow(relays.id)["state"]["reported"].get("relay1") == "on", 30, "relay1=on resynced")
    # and the device follows desired state again (its long-poll reconnected)
    cp.desire(relays.id, {"relay2": "off"})
    wait_until(lambda: relays.relays()["relay2"] == "off", 30, "desired relay2=off applied after the restart")
    wait_until(lambda: cp.shadow(relays.id)["state"]["reported"].get("relay2") == "off", 30, "relay2=off reported")
