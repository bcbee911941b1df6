"""Staged rollouts over 20 simulated devices: relays controllers under the unix micropython (OTA on: the firmware's own
download, Ed25519 check, swap, trial and rollback) against the real `picoiot server`.

The 20 devices are started together once for the module and serve both tests. The first release crashes at boot
(tests/devices/mp/rollout_sim.py): the canary stage rolls it back and the rollout pauses at its threshold before any
other device is offered it; a fixed release resumes it through every stage, the control plane restarting in the
middle of one. The second test aborts a rollout of a good release after its first stage started: the devices that had
not started keep their version. Kept lean for CI (75–105 s on a loaded 2-core machine, a quarter of it the 20 boots):
1 s heartbeats, 1 s soaks (6 s for the stage the restart falls in, so that it falls in it).
"""
import json
import re
import time

import pytest

from devtest import MP_DIR, NS, RUNTIME, SCRIPTS, ota_signing_key, wait_until, with_ota
from picoiot import ota_cli

N = 20
RO = f"/api/v1/namespaces/{NS}/ota/rollouts"
#: a canary of 2, then 25 % (3 more), then the other 15
SIZES = [2, 5, 20]


@pytest.fixture(scope="module")
def ota_key(cp, tmp_path_factory):
    return ota_signing_key(cp, tmp_path_factory.mktemp("ota"))


@pytest.fixture(scope="module")
def fleet(device_factory, ota_key):
    _, pub = ota_key
    devices = []
    for i in range(N):
        d = with_ota(device_factory("relays", name=f"ro{i:02d}", start=False), pub)
        d.child.entry = "rollout_sim"
        d.child.extra_path = SCRIPTS if RUNTIME == "micropython" else MP_DIR
        devices.append(d)
    for d in devices:  # all at once: the boots overlap instead of queueing
        d.child.start()
    for d in devices:
        d.child.wait_ready(120)
    return devices


def _release(cp, tmp_path, key, version, crash: bool) -> None:
    d = tmp_path / f"rel-{version}"
    d.mkdir()
    (d / "release.txt").write_text(version + "\n")
    if crash:
        (d / "crash_at_boot.py").write_text("raise ImportError('broken build')\n")
    ota_cli.publish(cp.url, cp.token(), NS, d, version, key)


def _rollout(cp, rid) -> dict:
    return cp.call("GET", f"{RO}/{rid}", "viewer")


def _wait(cp, devices, rid, pred, what, timeout=240, seen=None):
    """Wait until pred(rollout), restarting devices after their simulated resets meanwhile; `seen` collects every
    (state, stage) observed on the way."""
    def check():
        for d in devices:
            d.child.poll()  # restarts a device after a simulated reset (the install reset, the crash)
        r = _rollout(cp, rid)
        if seen is not None and (r["state"], r["stage"]) not in seen:
            seen.append((r["state"], r["stage"]))
        return r if pred(r) else None
    try:
        return wait_until(check, timeout, what, interval=0.3)
    except AssertionError:
        raise AssertionError(f"{what}: {json.dumps(_rollout(cp, rid), indent=1)}")


def _running(cp, ids) -> dict:
    ota = cp.call("GET", f"/api/v1/namespaces/{NS}/ota/status", "viewer")["devices"]
    return {x["device_id"]: x["running"] for x in ota if x["device_id"] in ids}


def _release_on_flash(d) -> str | None:
    p = d.child.flash_dir / "release.txt"
    return p.read_text().strip() if p.exists() else None


def test_bad_release_pauses_at_the_canary_then_a_fixed_one_goes_through_every_stage(cp, fleet, ota_key, tmp_path):
    key, _ = ota_key
    ids = [d.id for d in fleet]
    by_id = {d.id: d for d in fleet}
    _release(cp, tmp_path, key, "7.1.0", crash=True)
    stages = [{"devices": 2, "soak_s": 1}, {"percent": 25, "soak_s": 6}, {"percent": 100, "soak_s": 1}]
    r = cp.call("POST", RO, json={"version": "7.1.0", "target": {"devices": ids}, "stages": stages,
                                  "failure_threshold": 0.3})
    rid = r["id"]
    assert [s["devices"] for s in r["stage_detail"]] == [SIZES[0], SIZES[1] - SIZES[0], N - SIZES[1]]
    canary = {x["device_id"] for x in r["devices"] if x["stage"] == 0}
    others = set(ids) - canary

    # the first rollback is 1 of 2 (> 0.3): paused; a canary that had already started finishes (rolls back too)
    paused = _wait(cp, fleet, rid, lambda x: x["state"] == "paused"
                   and all(y["status"] in ("rolled_back", "pending") for y in x["devices"] if y["stage"] == 0),
                   "pause after the crash")
    rows = {x["device_id"]: x for x in paused["devices"]}
    rolled = [i for i in canary if rows[i]["status"] == "rolled_back"]
    assert rolled and all("reset before healthy" in rows[i]["reason"] for i in rolled), rows
    # the reason is the pause's: the first rollback (or both, when one evaluation saw them together)
    assert paused["stage"] == 0 and re.match(r"stage 1: [12] of 2 devices failed \(> 0\.3\): ", paused["reason"])
    assert all(by_id[i].child.restarts >= 2 for i in rolled)  # the install reset, then the crash
    # the others were never offered the broken release: pending, nothing on their flash, not running it
    assert {rows[i]["status"] for i in others} == {"pending"}
    assert not [i for i in others if _release_on_flash(by_id[i]) is not None]
    assert "7.1.0" not in _running(cp, ids).values()

    _release(cp, tmp_path, key, "7.1.1", crash=False)
    resumed = cp.call("POST", f"{RO}/{rid}/resume", json={"version": "7.1.1"})
    assert resumed["state"] == "running" and resumed["stage"] == 0 and resumed["version"] == "7.1.1"
    seen = [("running", 0)]
    # the control plane restarts in the middle of the second stage: its devices on trial, its soak running
    mid = _wait(cp, fleet, rid, lambda x: x["stage"] == 1 and all(
        y["status"] == "trial" for y in x["devices"] if y["stage"] == 1), "second stage on trial", seen=seen)
    assert mid["state"] == "running" and not [y for y in mid["devices"] if y["stage"] == 2 and y["status"] != "pending"]
    cp.stop()
    cp.start()
    # where it was (or just past it: the soak may have ended while the server was down), nothing started again
    after = _rollout(cp, rid)
    assert after["state"] in ("running", "completed") and after["stage"] >= 1, after
    assert {y["status"] for y in after["devices"] if y["stage"] <= 1} <= {"trial", "committed"}, after["devices"]
    done = _wait(cp, fleet, rid, lambda x: x["state"] in ("completed", "paused"), "completion", seen=seen)
    assert done["state"] == "completed", done["reason"]
    assert seen[:3] == [("running", 0), ("running", 1), ("running", 2)] and seen[-1] == ("completed", 2), seen
    assert {x["status"] for x in done["devices"]} == {"committed"}
    assert _running(cp, ids) == {i: "7.1.1" for i in ids}
    # each device's flash holds the release it committed, and no trace of the broken one
    for d in fleet:
        assert _release_on_flash(d) == "7.1.1"
        assert not (d.child.flash_dir / "crash_at_boot.py").exists()


def test_abort_leaves_the_devices_that_had_not_started_on_their_version(cp, fleet, ota_key, tmp_path):
    key, _ = ota_key
    ids = [d.id for d in fleet]
    by_id = {d.id: d for d in fleet}
    before = _running(cp, ids)
    _release(cp, tmp_path, key, "7.2.0", crash=False)
    r = cp.call("POST", RO, json={"version": "7.2.0", "target": {"devices": ids},
                                  "stages": [{"devices": 2, "soak_s": 600}, {"percent": 100, "soak_s": 1}]})
    rid = r["id"]
    started = {x["device_id"] for x in r["devices"] if x["stage"] == 0}
    _wait(cp, fleet, rid, lambda x: all(y["status"] == "trial" for y in x["devices"] if y["stage"] == 0),
          "the first stage on trial")
    aborted = cp.call("POST", f"{RO}/{rid}/abort", json={"reason": "enough"})
    assert aborted["state"] == "aborted" and aborted["reason"] == "enough"
    # two heartbeats of every device later, none of the others was offered it
    t = int(time.time() * 1000)
    wait_until(lambda: all((cp.device(i)["last_seen"] or 0) > t + 2000 for i in ids), 30, "two more heartbeats")
    after = _rollout(cp, rid)
    assert {x["status"] for x in after["devices"] if x["device_id"] not in started} == {"pending"}
    running = _running(cp, ids)
    assert {i: running[i] for i in ids if i not in started} == {i: before[i] for i in ids if i not in started}
    assert not [i for i in ids if i not in started and _release_on_flash(by_id[i]) == "7.2.0"]
    # the two that had started finished their install: a device is not stopped mid-update
    assert {running[i] for i in started} == {"7.2.0"}
    # aborted is final
    with cp.api() as c:
        assert c.post(f"{RO}/{rid}/resume", json={}).status_code == 409
