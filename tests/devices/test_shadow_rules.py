"""Who wins when the cloud and the device disagree (docs/devices.md, "Who wins"): a local command, a pulse's end,
max_on_s, interlock and failsafe win over a desired value the device has already applied; the device clears that
desired key (a versioned shadow update), so the control plane never re-applies it; a desired value written afterwards
is applied as usual. Observed on the simulated board's pin log, the device's REST API and the shadow.

"Afterwards nothing happens" is checked over the device's own heartbeats (each one tells it the shadow's version, the
moment a stale desired value used to come back), not over a wall-clock sleep."""
import pytest

from devtest import wait_until

PINS = {"boiler": 6, "valve": 7}
CONFIG = {"relays": {"boiler": {"pin": PINS["boiler"], "max_on_s": 1}, "valve": {"pin": PINS["valve"]}}}


@pytest.fixture(scope="module")
def dev(device_factory):
    return device_factory("relays", CONFIG, name="rules", pinlog=True)


def _heartbeats(cp, dev, n):
    """Wait until the device has sent n more heartbeats (and has had n chances to act on the shadow)."""
    def seq():
        hb = cp.device(dev.id).get("heartbeat") or {}
        return hb.get("seq", -1)
    start = seq()
    wait_until(lambda: seq() >= start + n, 30, f"{n} more heartbeats of {dev.id}")


def _seen(cp, dev):
    """Wait until the device holds the shadow's current version (its heartbeat says so): it knows the desired state."""
    def ok():
        v = cp.shadow(dev.id)["version"]
        return (cp.device(dev.id).get("heartbeat") or {}).get("state_version") == v
    wait_until(ok, 30, f"{dev.id} to hold the shadow's current version")


def _ons(dev, relay):
    """The number of off→on transitions of a relay's pin in the simulated board's log."""
    log = dev.pinlog()
    assert log["dropped"] == 0
    levels = [lv for _, pin, lv in log["events"] if pin == PINS[relay]]
    return sum(1 for a, b in zip(levels, levels[1:]) if a == 0 and b == 1)


def _state(dev, relay):
    r = dev.get(f"/gpio/{relay}")
    assert r.status_code == 200, r.text
    return r.json()


def _shadow(cp, dev):
    return cp.shadow(dev.id)["state"]


def test_no_chatter_under_max_on_with_a_desired_on(dev, cp):
    before = _ons(dev, "boiler")
    cp.desire(dev.id, {"boiler": "on"})
    wait_until(lambda: _ons(dev, "boiler") == before + 1, 30, "the desired on to reach the pin")
    wait_until(lambda: _state(dev, "boiler")["state"] == "off", 30, "max_on_s to switch the boiler off")
    _heartbeats(cp, dev, 3)
    assert _ons(dev, "boiler") == before + 1, f"the boiler went on again: {dev.pinlog()['events']}"
    assert _state(dev, "boiler")["state"] == "off" and _state(dev, "boiler")["cause"] == "max_on"
    st = _shadow(cp, dev)
    assert "boiler" not in st["desired"], "the device clears the desired value it had to override"
    assert st["reported"]["boiler"] == "off" and st["reported"]["cause"]["boiler"] == "max_on", st


def test_a_pulse_is_not_undone(dev, cp):
    cp.desire(dev.id, {"valve": "on"})
    wait_until(lambda: _state(dev, "valve")["state"] == "on", 30, "the desired on")
    wait_until(lambda: "valve" not in (_shadow(cp, dev).get("delta") or {}), 30, "valve=on reported")
    _seen(cp, dev)
    ons = _ons(dev, "valve")
    r = dev.post("/gpio/valve", json={"state": "on", "pulse_ms": 1500})  # already on: off when the pulse ends
    assert r.status_code == 200 and r.json()["state"] == "on", r.text
    wait_until(lambda: _state(dev, "valve")["state"] == "off", 30, "the pulse to end")
    assert _state(dev, "valve")["cause"] == "pulse"
    wait_until(lambda: "valve" not in _shadow(cp, dev)["desired"], 30, "the desired on to be cleared")
    _heartbeats(cp, dev, 3)
    assert _state(dev, "valve")["state"] == "off" and _ons(dev, "valve") == ons, dev.pinlog()["events"]


def test_a_local_on_after_a_cloud_off_sticks_and_a_later_cloud_change_is_applied(dev, cp):
    cp.desire(dev.id, {"valve": "off"})
    wait_until(lambda: _shadow(cp, dev)["reported"].get("valve") == "off"
               and "valve" not in (_shadow(cp, dev).get("delta") or {}), 30, "valve=off applied and reported")
    _seen(cp, dev)  # a desired value the device has not seen yet is not overridden: it is applied when it arrives
    r = dev.post("/gpio/valve", json={"state": "on"})
    assert r.status_code == 200 and r.json()["state"] == "on", r.text

    def local_won():
        st = _shadow(cp, dev)
        return ("valve" not in st["desired"] and st["reported"].get("valve") == "on"
                and st["reported"]["cause"]["valve"] == "local")
    wait_until(local_won, 30, "the device to clear the cloud's off and report the local on")
    _heartbeats(cp, dev, 3)
    assert _state(dev, "valve")["state"] == "on", "the local on must stick"

    # the same value the cloud desired before, written again after the local change: a new command, applied
    cp.desire(dev.id, {"valve": "off"})
    wait_until(lambda: _state(dev, "valve")["state"] == "off", 30, "the later cloud off to be applied")
    assert _state(dev, "valve")["cause"] == "desired"
    wait_until(lambda: _shadow(cp, dev)["reported"]["cause"].get("valve") == "desired", 30, "cause reported")
    assert _shadow(cp, dev)["desired"].get("valve") == "off", "an applied desired value stays in the shadow"
    # and a different value too
    cp.desire(dev.id, {"valve": "on"})
    wait_until(lambda: _state(dev, "valve")["state"] == "on", 30, "the later cloud on to be applied")


def test_desired_values_the_device_cannot_apply_are_refused_by_the_server(dev, cp):
    with cp.api("operator") as c:
        r = c.post(f"/api/v1/namespaces/default/devices/{dev.id}/shadows/default",
                   json={"state": {"desired": {"pump9": "on", "boiler": 1}}})
    assert r.status_code == 422, r.text
    assert {e["path"] for e in r.json()["detail"]["errors"]} == {"state.desired.pump9", "state.desired.boiler"}, r.text
    assert "pump9" not in _shadow(cp, dev)["desired"] and "boiler" not in _shadow(cp, dev)["desired"]


def test_desired_values_that_reach_the_device_anyway_are_rejected_not_applied(device_factory, cp):
    # written while the server could not check them: the device was enrolled without a type, which only its
    # registration tells; the device's own check is the second line
    late = device_factory("relays", CONFIG, name="untyped", start=False, typed=False, pinlog=True)
    cp.desire(late.id, {"pump9": "on", "boiler": 1, "valve": "on"})
    late.start()

    def rejected():
        rej = _shadow(cp, late)["reported"].get("rejected") or {}
        return rej if set(rej) == {"pump9", "boiler"} else None
    rej = wait_until(rejected, 30, "the device to report both desired values as rejected")
    assert rej["pump9"] == "unknown relay" and "on" in rej["boiler"], rej
    wait_until(lambda: _state(late, "valve")["state"] == "on", 30, "the good key of the same write to be applied")
    assert _state(late, "boiler")["state"] == "off" and _ons(late, "boiler") == 0
    # now that the server knows the device's relays, it refuses the same values itself
    with cp.api("operator") as c:
        r = c.post(f"/api/v1/namespaces/default/devices/{late.id}/shadows/default",
                   json={"state": {"desired": {"pump9": "on"}}})
    assert r.status_code == 422 and "pump9" in r.text, r.text
    cp.desire(late.id, {"pump9": None, "boiler": None})


def test_every_switch_is_one_structured_log_line_with_its_cause(dev):
    import json
    lines = []
    for raw in dev.child.log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("msg") == "relay switched" and "cause" in rec:
            lines.append(rec)
    causes = {(r["relay"], r["cause"]) for r in lines}
    assert {("boiler", "desired"), ("boiler", "max_on"), ("valve", "pulse"), ("valve", "local"),
            ("valve", "desired")} <= causes, causes
    assert all(isinstance(r["ts"], int) and r["state"] in ("on", "off") for r in lines), lines
