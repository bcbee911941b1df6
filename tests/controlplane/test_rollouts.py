"""Staged rollouts against the real control plane (SQLite and PostgreSQL), with lightweight simulated devices.

The devices are stepped by the test (heartbeat, offer, manifest, re-registration, report); the server's rollout task
evaluates on its own every `fleet_tick_s`. Conditions are awaited with wait_until (a synchronisation aid)."""
import os
import time
from pathlib import Path

import pytest

from cptest import wait_until
from fleetsim import SimDevice
from picoiot import ota_cli

RO = "/api/v1/namespaces/default/ota/rollouts"
FAST = {"fleet_tick_s": 0.1}
pytestmark = pytest.mark.real_server  # ota_cli publishes over HTTP to server.url


def _publish(server, tmp_path: Path, version: str) -> None:
    key = tmp_path / "ota.key"
    tok = server.token("admin")
    if not key.exists():
        ota_cli.set_key(server.url, tok, "default", ota_cli.keygen(key))
    d = tmp_path / f"rel-{version}"
    d.mkdir()
    (d / "main.py").write_text(f"print({version!r})\n")
    (d / "blob.bin").write_bytes(os.urandom(512))
    ota_cli.publish(server.url, tok, "default", d, version, key)


def _fleet(server, n: int, crash: dict[str, set] | None = None) -> list[SimDevice]:
    crash = crash or {}
    return [SimDevice(server, f"fd-{i:02d}", crash.get(f"fd-{i:02d}")) for i in range(n)]


def _get(server, rid: int) -> dict:
    r = server.client.get(f"{RO}/{rid}", headers=server.auth("viewer"))
    assert r.status_code == 200, r.text
    return r.json()


def _drive(server, devices, rid, until, timeout=30.0) -> dict:
    """Step every device until until(rollout) holds; returns the rollout."""
    deadline = time.monotonic() + timeout
    while True:
        for d in devices:
            d.step()
        r = _get(server, rid)
        if until(r):
            return r
        assert time.monotonic() < deadline, f"rollout stuck: {r['state']} stage {r['stage']} {r['stage_detail']}"
        time.sleep(0.05)


def _create(server, version, stages, target=None, **kw) -> dict:
    body = {"version": version, "target": target or {"namespace": True}, "stages": stages, **kw}
    r = server.client.post(RO, headers=server.auth("admin"), json=body)
    assert r.status_code == 201, r.text
    return r.json()


STAGES = [{"devices": 1, "soak_s": 0.2}, {"percent": 25, "soak_s": 0.2}, {"percent": 100, "soak_s": 0.2}]


def test_good_release_advances_through_every_stage(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "1.0")
    devices = _fleet(server, 20)
    r = _create(server, "1.0", STAGES)
    assert [s["devices"] for s in r["stage_detail"]] == [1, 4, 15]  # cumulative 1, 25 %, 100 % of 20
    first = {d["device_id"] for d in r["devices"] if d["stage"] == 0}
    # only the first stage is offered; everyone else is pending without an offer
    for d in devices:
        d.step()
    assert {d.id for d in devices if d.seen} == first
    done = _drive(server, devices, r["id"], lambda x: x["state"] == "completed")
    assert all(d["status"] == "committed" for d in done["devices"]), done["devices"]
    assert all(d.running == "1.0" and d.seen == ["1.0"] for d in devices)
    # the devices' locks are gone: a new rollout of the same devices is accepted, and refuses to downgrade
    _publish(server, tmp_path, "0.9")
    again = _create(server, "0.9", [{"percent": 100}])
    assert again["state"] == "completed" and {d["status"] for d in again["devices"]} == {"skipped"}
    assert "no downgrade" in again["devices"][0]["reason"]


def test_bad_release_pauses_at_the_threshold_then_resumes_with_a_fix(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "2.0")
    devices = _fleet(server, 20, crash={f"fd-{i:02d}": {"2.0"} for i in range(20)})
    r = _create(server, "2.0", STAGES, failure_threshold=0.0)
    paused = _drive(server, devices, r["id"], lambda x: x["state"] == "paused")
    first = [d for d in paused["devices"] if d["stage"] == 0]
    assert paused["stage"] == 0 and [d["status"] for d in first] == ["rolled_back"]
    assert "1 of 1 devices failed" in paused["reason"] and "reset before healthy" in paused["reason"]
    # nobody else was offered the bad release, and the one that rolled back is not offered it again
    for _ in range(3):
        for d in devices:
            d.step()
    assert sum(len(d.seen) for d in devices) == 1
    # the paused rollout raised nothing new; resume with a fixed release
    _publish(server, tmp_path, "2.1")
    rr = server.client.post(f"{RO}/{r['id']}/resume", headers=server.auth("admin"), json={"version": "2.1"})
    assert rr.status_code == 200 and rr.json()["state"] == "running", rr.text
    done = _drive(server, devices, r["id"], lambda x: x["state"] == "completed")
    assert {d["status"] for d in done["devices"]} == {"committed"}
    assert all(d.running == "2.1" for d in devices)
    rolled = next(d for d in devices if d.id == first[0]["device_id"])
    assert rolled.seen == ["2.0", "2.1"] and all(d.seen == ["2.1"] for d in devices if d is not rolled)


def test_threshold_counts_the_stage_share(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "3.0")
    devices = _fleet(server, 10)
    r = _create(server, "3.0", [{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
                failure_threshold=0.3)
    stage0 = {d["device_id"] for d in r["devices"] if d["stage"] == 0}
    bad = sorted(stage0)[:1]  # 1 of 5 = 0.2 ≤ 0.3: goes on
    for d in devices:
        if d.id in bad:
            d.crash.add("3.0")
    done = _drive(server, devices, r["id"], lambda x: x["state"] in ("completed", "paused"))
    assert done["state"] == "completed", done["reason"]
    assert sorted(d["device_id"] for d in done["devices"] if d["status"] == "rolled_back") == bad


def test_pause_resume_and_abort_by_the_operator(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "4.0")
    devices = _fleet(server, 6)
    a = server.auth("admin")
    r = _create(server, "4.0", [{"devices": 2, "soak_s": 600}, {"percent": 100}])
    p = server.client.post(f"{RO}/{r['id']}/pause", headers=a, json={"reason": "night shift"})
    assert p.status_code == 200 and p.json()["state"] == "paused" and p.json()["reason"] == "night shift"
    for d in devices:
        d.step()
    assert not any(d.seen for d in devices)  # paused before anyone started: the offers were taken back
    assert server.client.post(f"{RO}/{r['id']}/resume", headers=a).json()["state"] == "running"
    _drive(server, devices, r["id"], lambda x: x["stage_detail"][0]["counts"].get("trial") == 2)
    ab = server.client.post(f"{RO}/{r['id']}/abort", headers=a, json={})
    assert ab.status_code == 200 and ab.json()["state"] == "aborted"
    for _ in range(3):
        for d in devices:
            d.step()
    started = [d for d in devices if d.seen]
    assert len(started) == 2 and all(d.running == "0.1.0" for d in devices if d not in started)
    # an aborted rollout cannot be resumed; its devices are free for a new one
    assert server.client.post(f"{RO}/{r['id']}/resume", headers=a).status_code == 409
    _create(server, "4.0", [{"percent": 100}])


def test_one_active_rollout_per_device_and_bad_input(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "5.0")
    _fleet(server, 3)
    c, a = server.client, server.auth("admin")
    r = _create(server, "5.0", [{"devices": 1, "soak_s": 600}, {"percent": 100}], target={"devices": ["fd-00"]})
    conflict = c.post(RO, headers=a, json={"version": "5.0", "target": {"namespace": True},
                                           "stages": [{"percent": 100}]})
    assert conflict.status_code == 409 and conflict.json()["detail"]["devices"] == {"fd-00": r["id"]}
    cases = [
        ({"version": "nope", "target": {"namespace": True}, "stages": [{"percent": 100}]}, 404, "version"),
        ({"version": "5.0", "target": {"devices": []}, "stages": [{"percent": 100}]}, 422, "target"),
        ({"version": "5.0", "target": {}, "stages": [{"percent": 100}]}, 422, "target"),
        ({"version": "5.0", "target": {"group": "ghost"}, "stages": [{"percent": 100}]}, 404, "target.group"),
        ({"version": "5.0", "target": {"devices": ["ghost"]}, "stages": [{"percent": 100}]}, 404, "target.devices"),
        ({"version": "5.0", "target": {"devices": ["fd-01"]}, "stages": [{"percent": 10}, {"percent": 50}]}, 422,
         "stages.1.percent"),
        ({"version": "5.0", "target": {"devices": ["fd-01"]}, "stages": [{"percent": 50}, {"percent": 40}]}, 422,
         "stages.1.percent"),
        ({"version": "5.0", "target": {"devices": ["fd-01"]}, "stages": [{"percent": 100}],
          "failure_threshold": 1.5}, 422, "failure_threshold"),
        ({"version": "5.0", "target": {"devices": ["fd-01"]}, "stages": []}, 422, "stages"),
        ({"version": "5.0", "target": {"devices": ["fd-01"]}, "stages": [{"soak_s": 1}]}, 422, "stages.0"),
    ]
    for body, code, path in cases:
        rr = c.post(RO, headers=a, json=body)
        assert rr.status_code == code and rr.json()["detail"]["path"] == path, (body, rr.text)
    # an empty group is an empty target
    assert c.put("/api/v1/namespaces/default/groups/empty", headers=a, json={"overrides": {}}).status_code == 200
    rr = c.post(RO, headers=a, json={"version": "5.0", "target": {"group": "empty"}, "stages": [{"percent": 100}]})
    assert rr.status_code == 422 and rr.json()["detail"]["path"] == "target"
    assert c.post(RO, headers=server.auth("operator"), json={}).status_code in (403, 422)
    assert c.post(RO, headers=server.auth("operator"), json={
        "version": "5.0", "target": {"namespace": True}, "stages": [{"percent": 100}]}).status_code == 403
    assert c.get(f"{RO}/999", headers=a).status_code == 404
    assert c.get(RO, headers=server.auth("viewer")).json()["rollouts"][0]["id"] == r["id"]


def test_restart_in_the_middle_of_a_stage(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "6.0")
    devices = _fleet(server, 8)
    r = _create(server, "6.0", [{"devices": 2, "soak_s": 0.2}, {"percent": 100, "soak_s": 0.2}])
    # only one of the stage's two devices gets on with it: the stage cannot end before the restart
    one = next(d for d in devices if d.id == r["devices"][0]["device_id"])
    _drive(server, [one], r["id"], lambda x: x["devices"][0]["status"] == "committed")
    server.stop()
    server = server_factory(**FAST)  # same database
    for d in devices:
        d.use(server)
    before = _get(server, r["id"])
    assert before["state"] == "running" and before["stage"] == 0
    done = _drive(server, devices, r["id"], lambda x: x["state"] == "completed")
    assert {d["status"] for d in done["devices"]} == {"committed"} and all(d.seen == ["6.0"] for d in devices)


@pytest.mark.postgres
def test_two_servers_share_one_rollout(pg_server_factory, tmp_path):
    a, b = pg_server_factory(**FAST), pg_server_factory(**FAST)
    _publish(a, tmp_path, "7.0")
    devices = _fleet(a, 6)
    for d in devices[::2]:
        d.use(b)
    r = _create(a, "7.0", [{"devices": 1, "soak_s": 0.2}, {"percent": 100, "soak_s": 0.2}])
    # a conflicting create on the other process is refused too
    rr = b.client.post(RO, headers=b.auth("admin"), json={"version": "7.0", "target": {"namespace": True},
                                                           "stages": [{"percent": 100}]})
    assert rr.status_code == 409
    # an operator's pause on one process holds on the other, and a resume there lets both go on
    assert b.client.post(f"{RO}/{r['id']}/pause", headers=b.auth("admin"), json={}).json()["state"] == "paused"
    assert _get(a, r["id"])["state"] == "paused"
    for d in devices:
        d.step()
    assert not any(d.seen for d in devices)  # neither process offers the release while it is paused
    assert a.client.post(f"{RO}/{r['id']}/resume", headers=a.auth("admin"), json={}).json()["state"] == "running"
    done = _drive(b, devices, r["id"], lambda x: x["state"] == "completed")
    assert {d["status"] for d in done["devices"]} == {"committed"} and all(d.seen == ["7.0"] for d in devices)


def test_cli_rollout_commands(server_factory, tmp_path):
    from typer.testing import CliRunner

    from picoiot.cli import app
    server = server_factory(**FAST)
    _publish(server, tmp_path, "8.0")
    devices = _fleet(server, 4)
    env = {"PICOIOT_URL": server.url, "PICOIOT_TOKEN": server.token("admin")}
    run = CliRunner().invoke

    def cli(*args, code=0):
        res = run(app, ["ota", "rollout", *args], env=env)
        assert res.exit_code == code, res.output
        return res.output
    out = cli("create", "8.0", "--all", "--stages", "1,50%,100%", "--soak", "0", "--threshold", "0.5")
    assert "rollout 1: 8.0" in out and "running, stage 1/3" in out
    assert "device already in an active rollout" in cli("create", "8.0", "--device", "fd-00", code=2)
    assert "bad stage" in cli("create", "8.0", "--all", "--stages", "1,half", code=2)
    assert "paused" in cli("pause", "1", "--reason", "checking")
    assert "running" in cli("resume", "1")
    _drive(server, devices, 1, lambda x: x["state"] == "completed")
    status = cli("status", "1")
    assert "completed" in status and status.count(" committed\n") == 4 and "stage 3 [100%, soak 0s]" in status
    assert "rollout 1" in cli("status")
    assert "rollout is completed" in cli("abort", "1", code=2)


def test_a_device_offline_during_its_trial_is_a_failure(server_factory, tmp_path):
    # no device type: the server's 1 s heartbeat interval, and a TTL of 1 s
    server = server_factory(**FAST, default_heartbeat_s=1, ttl_missed=1, ttl_slack_s=0)
    _publish(server, tmp_path, "9.0")
    devices = [SimDevice(server, f"off-{i}", device_type=None) for i in range(4)]
    r = _create(server, "9.0", [{"devices": 1, "soak_s": 600}, {"percent": 100, "soak_s": 0}])
    first = next(d for d in devices if d.id == r["devices"][0]["device_id"])
    assert first.step() == "installed"
    wait_until(lambda: _get(server, r["id"])["devices"][0]["status"] == "trial")
    # it falls silent during its soak: the sweep calls it offline, the rollout counts a failure and pauses
    paused = _drive(server, [d for d in devices if d is not first], r["id"], lambda x: x["state"] == "paused")
    row = next(d for d in paused["devices"] if d["device_id"] == first.id)
    assert row["status"] == "failed" and row["reason"] == "offline during trial (trial)"
    assert all(not d.seen for d in devices if d is not first)


def test_a_failed_install_counts_towards_the_threshold(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "10.0")
    devices = [SimDevice(server, f"fi-{i}", fail={"10.0"}) for i in range(5)]
    r = _create(server, "10.0", [{"devices": 1, "soak_s": 0}, {"percent": 100, "soak_s": 0}], failure_threshold=0.5)
    paused = _drive(server, devices, r["id"], lambda x: x["state"] == "paused")
    [row] = [d for d in paused["devices"] if d["stage"] == 0]
    assert row["status"] == "failed" and row["reason"] == "OTAError: sha256 mismatch"
    assert "1 of 1 devices failed (> 0.5)" in paused["reason"] and "sha256 mismatch" in paused["reason"]
    assert sum(len(d.seen) for d in devices) == 1  # the others were never offered it


def test_each_step_of_a_device_shows_in_its_status(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "11.0")
    dev = server.register("steps-1", firmware="0.1.0")
    r = _create(server, "11.0", [{"percent": 100, "soak_s": 0.3}], target={"devices": ["steps-1"]})
    c = server.client

    def status():
        return _get(server, r["id"])["devices"][0]["status"]
    assert status() == "pending"
    offer = c.get(dev.services["ota"], headers=dev.headers).json()
    assert offer["version"] == "11.0" and status() == "pending"  # offered, not fetched yet
    assert c.get(offer["manifest_url"], headers=dev.headers).status_code == 200
    wait_until(lambda: status() == "downloading")
    dev = server.register("steps-1", firmware="0.1.0")  # the install reset: the new set boots on trial
    wait_until(lambda: status() == "installed")
    assert c.post(dev.services["ota"] + "/report", headers=dev.headers,
                  json={"version": "11.0", "status": "installed"}).status_code == 200
    wait_until(lambda: status() in ("trial", "committed"))
    wait_until(lambda: status() == "committed")
    assert _get(server, r["id"])["state"] == "completed"


def test_a_downgrade_only_when_the_rollout_says_so(server_factory, tmp_path):
    server = server_factory(**FAST)
    _publish(server, tmp_path, "0.0.9")
    devices = _fleet(server, 3)  # running 0.1.0
    refused = _create(server, "0.0.9", [{"percent": 100}])
    assert refused["state"] == "completed" and {d["status"] for d in refused["devices"]} == {"skipped"}
    assert not any(d.step() for d in devices)
    allowed = _create(server, "0.0.9", [{"percent": 100, "soak_s": 0}], allow_downgrade=True)
    assert {d["status"] for d in allowed["devices"]} == {"pending"}
    done = _drive(server, devices, allowed["id"], lambda x: x["state"] == "completed")
    assert {d["status"] for d in done["devices"]} == {"committed"} and all(d.running == "0.0.9" for d in devices)
