"""The container image and the Kubernetes manifests (deploy/kubernetes/): valid against the Kubernetes API schemas
(kubernetes-validate, strict), and saying what docs/control-plane.md promises — ≥ 2 replicas, probes on /health and
/ready, keys from a Secret, PostgreSQL by URL, a non-root image of the control plane only — and the graceful shutdown
they rely on: SIGTERM answers the held long-polls at once instead of cutting them."""
import json
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes_validate import utils as kv

from picoiot.procs import ServerChild

REPO = Path(__file__).resolve().parents[2]
KDIR = REPO / "deploy" / "kubernetes"
VERSIONS = ("1.30.0", kv.latest_version())  # the oldest Kubernetes still commonly run, and the newest schemas


def _wait_until(pred, timeout, what):
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _docs():
    out = []
    for f in sorted(KDIR.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out.append((f.name, d))
    return out


def _kind(kind):
    found = [d for _, d in _docs() if d.get("kind") == kind]
    assert found, f"no {kind} in deploy/kubernetes"
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    checked = 0
    for name, d in _docs():
        if d["kind"] == "Kustomization":  # not an API object; its resources must all exist
            for r in d["resources"]:
                assert (KDIR / r).is_file(), r
            continue
        kv.validate(d, version, strict=True)  # raises ValidationError naming the field
        checked += 1
    assert checked >= 5


def test_a_broken_manifest_is_refused():
    dep = dict(_kind("Deployment")[0])
    dep["spec"] = dict(dep["spec"], replicas="two")
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, VERSIONS[-1], strict=True)


def test_the_deployment_is_what_the_docs_promise():
    dep = _kind("Deployment")[0]
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e for e in c["env"]}
    assert env["PICOIOT_DB"]["valueFrom"]["secretKeyRef"]["name"] == "picoiot-db"
    secrets = {s["metadata"]["name"]: s for s in _kind("Secret")}
    assert "url" in secrets["picoiot-db"]["stringData"]
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] in secrets
    assert "secrets.json" in secrets[keys["secret"]["secretName"]]["stringData"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "keys")
    assert mount["mountPath"] == env["PICOIOT_DATA_DIR"]["value"] + "/secrets.json"
    assert pod["terminationGracePeriodSeconds"] > 5  # beyond the server's own 5 s grace for requests in flight
    # the Service and the PDB select these pods
    labels = spec["template"]["metadata"]["labels"]
    (svc,) = _kind("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", c["ports"][0]["containerPort"])
    (pdb,) = _kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    # the arguments exist on the CLI the image runs
    help_text = subprocess.run([sys.executable, "-m", "picoiot.cli", "server", "--help"], capture_output=True,
                               text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    for arg in c.get("args", []):
        if arg.startswith("--"):
            assert arg in help_text, arg


def test_the_image_is_the_control_plane_only_and_not_root():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.strip()
             and not ln.strip().startswith("#")]
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")):]  # the last stage
    users = [ln.split(None, 1)[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = json.loads(next(ln for ln in final if ln.startswith("ENTRYPOINT ")).split(None, 1)[1])
    assert entry[:2] == ["picoiot", "server"] and "0.0.0.0" in entry
    copied = " ".join(ln for ln in lines if ln.startswith("COPY "))
    assert "firmware" not in copied and "tests" not in copied
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"firmware", "tests", ".venv"} <= set(ignore)
    help_text = subprocess.run([sys.executable, "-m", "picoiot.cli", *entry[1:], "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for arg in entry[2:]:
        if arg.startswith("--"):
            assert arg in help_text, shlex.join(entry)


def test_sigterm_answers_held_long_polls_at_once(tmp_path):
    """Graceful shutdown drains: a device's held heartbeat gets its answer (200, its ack) when the server is told to
    stop, rather than a cut connection at the end of the grace time; new connections are refused meanwhile."""
    from picoiot.procs import provision_over_api
    from picoiot.server.auth import issue_token
    from picoiot.server.settings import Settings
    import hashlib
    import hmac

    srv = ServerChild(tmp_path / "cp")
    srv.start()
    c = httpx.Client(base_url=srv.url, timeout=60)
    try:
        sec = Settings.from_data_dir(srv.data_dir).secrets
        key = provision_over_api(srv.url, issue_token(sec.signing_key, "t", "default", "admin", 600), "drain-1",
                                 "relays", "default")
        nonce = c.post("/api/devices/challenge", json={"device_id": "drain-1"}).json()["nonce"]
        sig = hmac.new(key["device_key"].encode(), f"{nonce}|drain-1".encode(), hashlib.sha256).hexdigest()
        reg = c.post("/api/devices/register", json={"device_id": "drain-1", "nonce": nonce, "signature": sig,
                                                     "device_type": "relays", "firmware": "0.1.0"}).json()
        hdr = {"Authorization": f"Bearer {reg['token']}"}
        hb = reg["services"]["heartbeat"]
        pend = c.post(hb, headers=hdr, json={"seq": 1}).json()["pending"]
        out = {}

        def poll():  # held: nothing will change (the versions are the current ones)
            try:
                out["r"] = c.post(hb, headers=hdr, params={"wait": 60}, json={
                    "seq": 2, "config_version": pend["config_version"], "state_version": pend["state_version"]})
            except httpx.HTTPError as e:
                out["e"] = e
        t = threading.Thread(target=poll)
        t.start()

        def waiting():
            for line in httpx.get(srv.url + "/metrics", timeout=10).text.splitlines():
                if line.startswith('picoiot_longpolls_waiting{kind="heartbeat"} '):
                    return float(line.rsplit(" ", 1)[1]) >= 1
            return False
        _wait_until(waiting, 30, "the heartbeat to be held")
        srv.proc.send_signal(signal.SIGTERM)
        t.join(30)  # far below the 60 s the poll asked for
        assert not t.is_alive(), "the held long-poll was not answered on SIGTERM"
        assert "r" in out, f"the long-poll was cut instead of answered: {out.get('e')!r}"
        assert out["r"].status_code == 200 and out["r"].json()["ack"] == 2, out["r"].text
        assert srv.proc.wait(30) == 0
    finally:
        c.close()  # its pooled connection, else a socket the GC finds unclosed during a later test
        srv.stop()
