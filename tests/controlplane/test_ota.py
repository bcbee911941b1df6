"""OTA service: publish (CLI functions over real HTTP), assign, the device's offer/manifest/files/report, errors."""
import hashlib
import json
import os
import stat
import threading
import sys
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from picoiot import ota_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))
from iotlib import ed25519  # noqa: E402  (the device's verifier checks what the server serves)

OTA = "/api/v1/namespaces/default/ota"
pytestmark = pytest.mark.real_server  # ota_cli publishes over HTTP to server.url


def _release_dir(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"rel-{tag}"
    (d / "iotlib").mkdir(parents=True)
    (d / "main.py").write_text(f"print('{tag}')\n")
    (d / "iotlib" / "a.py").write_bytes(os.urandom(20000))
    return d


def _setup(server, tmp_path):
    key = tmp_path / "ota.key"
    pub = ota_cli.keygen(key)
    tok = server.token("admin")
    ota_cli.set_key(server.url, tok, "default", pub)
    return key, pub, tok


def test_keygen_writes_a_private_file_and_never_overwrites(tmp_path):
    key = tmp_path / "k"
    pub = ota_cli.keygen(key)
    assert len(pub) == 64 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert SigningKey(bytes.fromhex(key.read_text().strip())).verify_key.encode().hex() == pub
    try:
        ota_cli.keygen(key)
        raise AssertionError("overwrote the key")
    except FileExistsError:
        pass


def test_publish_assign_and_device_download(server, tmp_path):
    key, pub, tok = _setup(server, tmp_path)
    src = _release_dir(tmp_path, "v2")
    out = ota_cli.publish(server.url, tok, "default", src, "2.0", key)
    assert out == {"version": "2.0", "files": 2, "created": True}
    # publishing the same release again is a harmless retry
    assert ota_cli.publish(server.url, tok, "default", src, "2.0", key)["created"] is False
    dev = server.register("relay-1")
    c = server.client
    r = c.get(dev.services["ota"], headers=dev.headers)
    assert r.status_code == 204
    ota_cli.assign(server.url, tok, "default", "2.0", "relay-1", None)
    offer = c.get(dev.services["ota"], headers=dev.headers)
    assert offer.status_code == 200
    offer = offer.json()
    assert offer["version"] == "2.0"
    doc = c.get(offer["manifest_url"], headers=dev.headers).json()
    # the device-side verifier accepts what the server serves, with the publisher's key
    assert ed25519.verify(bytes.fromhex(pub), doc["manifest"].encode(), bytes.fromhex(doc["signature"]))
    m = json.loads(doc["manifest"])
    for f in m["files"]:
        data = b""
        while len(data) < f["size"]:
            r = c.get(f"{offer['files_url']}/{f['sha256']}", params={"offset": len(data), "length": 4096},
                      headers=dev.headers)
            assert r.status_code == 200 and 0 < len(r.content) <= 4096
            data += r.content
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert data == (src / f["path"]).read_bytes()
    st = ota_cli.status(server.url, tok, "default", "relay-1")["devices"][0]
    assert st["assigned"] == "2.0" and st["pending"] == "2.0" and st["running"] == "0.1.0"
    # the device installs it: nothing pending any more
    r = c.post(dev.services["ota"] + "/report", headers=dev.headers, json={"version": "2.0", "status": "installed"})
    assert r.status_code == 200
    assert c.get(dev.services["ota"], headers=dev.headers).status_code == 204
    st = ota_cli.status(server.url, tok, "default")["devices"][0]
    assert st["running"] == "2.0" and st["pending"] is None and st["report"]["status"] == "installed"


def test_rolled_back_release_is_not_offered_again_until_reassigned(server, tmp_path):
    key, _, tok = _setup(server, tmp_path)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "v3"), "3.0", key)
    dev = server.register("relay-2")
    c = server.client
    ota_cli.assign(server.url, tok, "default", "3.0", "relay-2", None)
    assert c.get(dev.services["ota"], headers=dev.headers).status_code == 200
    r = c.post(dev.services["ota"] + "/report", headers=dev.headers,
               json={"version": "3.0", "status": "rolled_back", "reason": "reset before healthy", "running": "0.1.0"})
    assert r.status_code == 200
    assert c.get(dev.services["ota"], headers=dev.headers).status_code == 204
    st = ota_cli.status(server.url, tok, "default", "relay-2")["devices"][0]
    assert st["running"] == "0.1.0" and st["report"]["reason"] == "reset before healthy"
    ota_cli.assign(server.url, tok, "default", "3.0", "relay-2", None)  # the operator retries
    assert c.get(dev.services["ota"], headers=dev.headers).json()["version"] == "3.0"
    ota_cli.assign(server.url, tok, "default", None, "relay-2", None)  # and clears it
    assert c.get(dev.services["ota"], headers=dev.headers).status_code == 204


def test_group_assignment_and_device_override(server, tmp_path):
    key, _, tok = _setup(server, tmp_path)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "g1"), "g1", key)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "g2"), "g2", key)
    a = server.auth("admin")
    c = server.client
    assert c.put("/api/v1/namespaces/default/groups/garage", headers=a, json={"overrides": {}}).status_code == 200
    d1, d2 = server.register("gd-1"), server.register("gd-2")
    for d in ("gd-1", "gd-2"):
        assert c.patch(f"/api/v1/namespaces/default/devices/{d}", headers=a, json={"group": "garage"}).status_code == 200
    ota_cli.assign(server.url, tok, "default", "g1", None, "garage")
    ota_cli.assign(server.url, tok, "default", "g2", "gd-2", None)
    assert c.get(d1.services["ota"], headers=d1.headers).json()["version"] == "g1"
    assert c.get(d2.services["ota"], headers=d2.headers).json()["version"] == "g2"


def test_bad_input_is_refused_with_json_errors(server, tmp_path):
    c = server.client
    a = server.auth("admin")
    src = _release_dir(tmp_path, "bad")
    text, blobs = ota_cli.build_release(src, "9.0")
    sk = SigningKey.generate()
    sig = sk.sign(text.encode()).signature.hex()
    # no namespace key yet
    for sha, data in blobs.items():
        assert c.put(f"{OTA}/files/{sha}", headers=a, content=data).status_code == 200
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": text, "signature": sig})
    assert r.status_code == 409 and "public key" in r.json()["error"]
    assert c.put(f"{OTA}/key", headers=a, json={"public_key": "xyz"}).status_code == 422
    assert c.put(f"{OTA}/key", headers=a, json={"public_key": sk.verify_key.encode().hex()}).status_code == 200
    # signed by another key / tampered manifest
    other = SigningKey.generate().sign(text.encode()).signature.hex()
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": text, "signature": other})
    assert r.status_code == 422 and r.json()["error"] == "bad signature"
    tampered = text.replace("9.0", "9.1")
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": tampered, "signature": sig})
    assert r.status_code == 422 and r.json()["error"] == "bad signature"
    # file content that does not match its name
    sha = next(iter(blobs))
    r = c.put(f"{OTA}/files/{sha}", headers=a, content=b"not it")
    assert r.status_code == 422 and r.json()["error"] == "sha256 mismatch"
    assert c.put(f"{OTA}/files/NOTHEX", headers=a, content=b"x").status_code == 400
    # a manifest naming a file nobody uploaded
    m = json.loads(text)
    m["files"].append({"path": "extra.py", "sha256": "0" * 64, "size": 3})
    t2 = json.dumps(m)
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": t2, "signature": sk.sign(t2.encode()).signature.hex()})
    assert r.status_code == 422 and "not uploaded: extra.py" in r.json()["error"]
    assert r.json()["detail"]["path"] == "files.2.sha256"
    # bad paths in a (validly signed) manifest
    m["files"][-1]["path"] = "../boot.py"
    t3 = json.dumps(m)
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": t3, "signature": sk.sign(t3.encode()).signature.hex()})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "files.2.path"
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": "{not json", "signature": sig})
    assert r.status_code == 422
    # the good one, then the same version with another manifest
    assert c.post(f"{OTA}/releases", headers=a, json={"manifest": text, "signature": sig}).status_code == 201
    t4 = json.dumps(json.loads(text))  # same content, different bytes
    r = c.post(f"{OTA}/releases", headers=a, json={"manifest": t4, "signature": sk.sign(t4.encode()).signature.hex()})
    assert r.status_code == 409
    # assignments
    server.register("relay-9")
    for body, code, err in (({"version": "nope", "device": "relay-9"}, 404, "unknown release"),
                            ({"version": "9.0", "device": "ghost"}, 404, "unknown device"),
                            ({"version": "9.0", "group": "ghost"}, 404, "unknown group"),
                            ({"version": "9.0"}, 422, "give exactly one of device, group"),
                            ({"version": "9.0", "device": "relay-9", "group": "g"}, 422,
                             "give exactly one of device, group")):
        r = c.put(f"{OTA}/assignments", headers=a, json=body)
        assert r.status_code == code and r.json()["error"] == err, (body, r.text)
    # roles
    r = c.post(f"{OTA}/releases", headers=server.auth("operator"), json={"manifest": text, "signature": sig})
    assert r.status_code == 403
    assert c.get(f"{OTA}/status", headers=server.auth("viewer")).status_code == 200


def test_device_side_access_rules(server, tmp_path):
    key, _, tok = _setup(server, tmp_path)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "d"), "d1", key)
    d1, d2 = server.register("dev-a"), server.register("dev-b")
    c = server.client
    # a device cannot ask on another device's behalf
    assert c.get(d2.services["ota"], headers=d1.headers).status_code == 404
    # only devices report
    r = c.post(d1.services["ota"] + "/report", headers=server.auth("admin"), json={"version": "d1", "status": "installed"})
    assert r.status_code == 403
    r = c.post(d1.services["ota"] + "/report", headers=d1.headers, json={"version": "d1", "status": "bricked"})
    assert r.status_code == 422
    r = c.get(d1.services["ota"] + "/releases/nope/manifest", headers=d1.headers)
    assert r.status_code == 404 and r.json()["error"] == "unknown release"
    r = c.get(d1.services["ota"] + "/files/" + "0" * 64, headers=d1.headers)
    assert r.status_code == 404 and r.json()["error"] == "unknown file"
    r = c.get(d1.services["ota"] + "/files/" + "0" * 64, params={"length": 10 ** 6}, headers=d1.headers)
    assert r.status_code == 422
    # another namespace's device sees nothing of this namespace's releases
    other = server.register("dev-o", ns="other")
    r = c.get(other.services["ota"] + "/releases/d1/manifest", headers=other.headers)
    assert r.status_code == 404


def test_heartbeat_answer_names_the_pending_release(server, tmp_path):
    key, _, tok = _setup(server, tmp_path)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "h"), "h1", key)
    dev = server.register("hb-1")
    c = server.client

    def pending():
        r = c.post(dev.services["heartbeat"], headers=dev.headers, json={"seq": 1, "uptime": 1})
        assert r.status_code == 200
        return r.json()["pending"]["ota"]
    assert pending() is None
    ota_cli.assign(server.url, tok, "default", "h1", "hb-1", None)
    assert pending() == "h1"
    c.post(dev.services["ota"] + "/report", headers=dev.headers, json={"version": "h1", "status": "installed"})
    assert pending() is None


def test_firmware_ota_manager_installs_and_reports_against_the_real_server(server, tmp_path):
    """The device side (the offer check of iotlib.device, iotlib.ota on CPython, iotlib.http client) against this server: offer → verified download →
    swap → trial boot → healthy → report; then a second release rolled back by a reset during its trial."""
    import asyncio

    from iotlib.otaguard import ota_offer
    from iotlib.http import HTTPClient
    from iotlib.ota import OTAUpdateManager
    from iotlib.otaboot import OTABoot

    key, pub, tok = _setup(server, tmp_path)
    dev = server.register("e2e-1")
    flash = tmp_path / "flash"
    (flash / "iotlib").mkdir(parents=True)
    (flash / "main.py").write_text("print('v1')\n")
    src = _release_dir(tmp_path, "e2e")
    ota_cli.publish(server.url, tok, "default", src, "2.0", key)
    ota_cli.assign(server.url, tok, "default", "2.0", "e2e-1", None)
    url = dev.services["ota"]

    async def update():
        http = HTTPClient(max_body=64 * 1024)
        mgr = OTAUpdateManager(str(flash), public_key=pub)
        offer = await ota_offer(http, url, dev.headers)
        assert offer and offer["version"] == "2.0"
        return await mgr.update(http, offer, dev.headers, running="0.1.0")

    assert asyncio.run(update()) == "2.0"
    assert (flash / "main.py").read_text() == "print('e2e')\n"
    assert (flash / "iotlib" / "a.py").read_bytes() == (src / "iotlib" / "a.py").read_bytes()
    ob = OTABoot(str(flash), public_key=pub)
    assert ob.boot()["trial"] == "2.0"
    assert ob.healthy() == "2.0"
    assert asyncio.run(ob.send_result(HTTPClient(), url, dev.headers)) is True
    assert ob.pending_result() is None
    st = ota_cli.status(server.url, tok, "default", "e2e-1")["devices"][0]
    assert st["running"] == "2.0" and st["pending"] is None and st["report"]["status"] == "installed"

    # release 3.0 whose trial never gets healthy: rolled back, reported, not offered again
    (src / "main.py").write_text("print('v3')\n")
    ota_cli.publish(server.url, tok, "default", src, "3.0", key)
    ota_cli.assign(server.url, tok, "default", "3.0", "e2e-1", None)

    async def update3():
        http = HTTPClient(max_body=64 * 1024)
        mgr = OTAUpdateManager(str(flash), public_key=pub)
        return await mgr.update(http, await ota_offer(http, url, dev.headers), dev.headers, running="2.0")
    assert asyncio.run(update3()) == "3.0"
    OTABoot(str(flash)).boot()                                      # trial boot
    assert OTABoot(str(flash)).boot()["rolled_back"] == "3.0"      # reset before healthy
    assert (flash / "main.py").read_text() == "print('e2e')\n"
    assert asyncio.run(OTABoot(str(flash)).send_result(HTTPClient(), url, dev.headers)) is True
    st = ota_cli.status(server.url, tok, "default", "e2e-1")["devices"][0]
    assert st["report"]["status"] == "rolled_back" and st["running"] == "2.0" and st["pending"] is None
    assert server.client.get(url, headers=dev.headers).status_code == 204


def _held_heartbeat(server, dev, params):
    """A heartbeat long-poll in a thread, returned once the server holds it."""
    out = {}
    gauge = server.cp.metrics.longpolls.labels("heartbeat")
    before = gauge._value.get()

    def poll():
        out["r"] = server.client.post(dev.services["heartbeat"], headers=dev.headers,
                                      params={"wait": 30, "config_version": 1, "state_version": 0, **params},
                                      json={"seq": 1, "config_version": 1, "state_version": 0})
    t = threading.Thread(target=poll)
    t.start()
    from cptest import wait_until
    wait_until(lambda: gauge._value.get() > before)
    return t, out


def test_an_ota_assignment_wakes_a_held_heartbeat(server, tmp_path):
    key, pub, tok = _setup(server, tmp_path)
    for v in ("2.0", "3.0"):
        ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, v), v, key)
    a = server.auth()
    assert server.client.put("/api/v1/namespaces/default/groups/g", headers=a, json={"overrides": {}}).status_code < 300
    assert server.client.post("/api/v1/namespaces/default/devices", headers=a,
                              json={"device_id": "relay-2", "device_type": "relays", "group": "g"}).status_code == 201
    one, two = server.register("relay-1"), server.register("relay-2")

    # a device's own assignment; the poll (held for up to 30 s) answers well before, with the offer
    t, out = _held_heartbeat(server, one, {})
    ota_cli.assign(server.url, tok, "default", "2.0", "relay-1", None)
    t.join(15)
    assert not t.is_alive(), "the assignment did not wake the held heartbeat"
    assert out["r"].json()["pending"]["ota"] == "2.0"
    # told of 2.0 (`ota`), the next poll holds until the offer changes: here, withdrawn
    t, out = _held_heartbeat(server, one, {"ota": "2.0"})
    assert t.is_alive()
    ota_cli.assign(server.url, tok, "default", None, "relay-1", None)
    t.join(15)
    assert not t.is_alive() and out["r"].json()["pending"]["ota"] is None

    # a group's assignment wakes its members (`ota` empty: none known)
    t, out = _held_heartbeat(server, two, {"ota": ""})
    ota_cli.assign(server.url, tok, "default", "3.0", None, "g")
    t.join(15)
    assert not t.is_alive(), "the group assignment did not wake its member's held heartbeat"
    assert out["r"].json()["pending"]["ota"] == "3.0"
    r = server.client.post(two.services["heartbeat"], headers=two.headers, params={"wait": 1, "ota": "a b"},
                           json={"seq": 2})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "ota", r.text


def test_a_rollouts_offer_wakes_a_held_heartbeat(server, tmp_path):
    # the rollout engine's offers reach a device as an operator's assignment does: at once, not at its next heartbeat
    key, pub, tok = _setup(server, tmp_path)
    ota_cli.publish(server.url, tok, "default", _release_dir(tmp_path, "2.0"), "2.0", key)
    one = server.register("relay-1")
    t, out = _held_heartbeat(server, one, {"ota": ""})
    r = server.client.post("/api/v1/namespaces/default/ota/rollouts", headers=server.auth(),
                           json={"version": "2.0", "target": {"devices": ["relay-1"]}, "stages": [{"percent": 100}]})
    assert r.status_code < 300, r.text
    t.join(15)
    assert not t.is_alive(), "the rollout's offer did not wake the held heartbeat"
    assert out["r"].json()["pending"]["ota"] == "2.0"
