"""A download cut by a control-plane restart (issue 15's gap): the device, a relays controller under the unix
micropython with OTA on, is in its update boot, the manifest fetched, when the real `picoiot server` stops; its next
chunk request is refused. That says nothing about the release: the device retries (in the same update boot, or after
a normal boot when every attempt of it was cut) once the server is back, and commits. The rollout never sees a
failure, so it completes instead of pausing."""
import os
import signal

from devtest import NS, ota_signing_key, wait_until, with_ota
from picoiot import ota_cli

RO = f"/api/v1/namespaces/{NS}/ota/rollouts"
#: a release large enough that its download takes hundreds of chunk requests (the device fetches 1 KiB at a time)
FILES = 4
FILE_BYTES = 60 * 1024


def test_a_download_cut_by_a_control_plane_restart_is_retried_not_failed(cp, device_factory, tmp_path):
    key, pub = ota_signing_key(cp, tmp_path)
    rel = tmp_path / "rel"
    rel.mkdir()
    for i in range(FILES):
        (rel / f"blob{i}.bin").write_bytes(os.urandom(FILE_BYTES))
    (rel / "release.txt").write_text("8.0.0\n")
    ota_cli.publish(cp.url, cp.token(), NS, rel, "8.0.0", key)
    d = with_ota(device_factory("relays", name="cut", start=False), pub)
    d.child.start()
    d.child.wait_ready(90)

    r = cp.call("POST", RO, json={"version": "8.0.0", "target": {"devices": [d.id]},
                                  "stages": [{"percent": 100, "soak_s": 1}], "failure_threshold": 0})
    rid = r["id"]
    seen = []

    def status():
        d.child.poll()  # restarts the device after its simulated resets (into the update boot, the trial, ...)
        x = cp.call("GET", f"{RO}/{rid}", "viewer")
        row = x["devices"][0]
        if row["status"] not in seen:
            seen.append(row["status"])
        return x, row

    # the manifest fetched (the device verifies its signature before the first chunk): freeze the device, stop the
    # control plane, let the device run on into a refused download
    wait_until(lambda: status()[1]["status"] == "downloading", 120, "the device to fetch the manifest", 0.02)
    os.kill(d.child.pid, signal.SIGSTOP)
    try:
        cp.stop()
    finally:
        os.kill(d.child.pid, signal.SIGCONT)
    wait_until(lambda: any(m in d.child.log.read_bytes() for m in (b'"ota download cut"', b'"ota failed"')), 60,
               "the device to meet the stopped server")
    cp.start()

    done = wait_until(lambda: (lambda x: x if x[0]["state"] in ("completed", "paused") else None)(status()), 240,
                      "the rollout to end")[0]
    assert done["state"] == "completed", (done["reason"], seen)
    assert done["devices"][0]["status"] == "committed" and "failed" not in seen, seen
    assert b'"ota download cut"' in d.child.log.read_bytes()  # the download was cut, not finished before the stop
    assert (d.child.flash_dir / "release.txt").read_text() == "8.0.0\n"
    ota = cp.call("GET", f"/api/v1/namespaces/{NS}/ota/status", "viewer", params={"device": d.id})["devices"][0]
    assert ota["running"] == "8.0.0" and ota["report"]["status"] == "installed", ota
