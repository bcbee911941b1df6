"""A device whose key the control plane refuses says so (not "control plane unreachable"), and the heartbeat ladder does
not take its Wi-Fi down for it: the link and the server are fine, its id or key is not (issue 17, first hour)."""
import json
import time

from devtest import wait_until


def test_a_refused_key_is_named_and_does_not_reconnect_wifi(device_factory):
    d = device_factory("relays", name="wrong-key", start=False)
    path = d.child.settings
    s = json.loads(path.read_text())
    s["device_key"] = "00" * 32  # enrolled, but this is not its key: the signature is refused (401)
    s["config"] = {"heartbeat_interval_s": 1}  # missed heartbeats escalate within seconds
    path.write_text(json.dumps(s))
    d.child.start()  # never ready: it cannot register
    log = d.child.log
    wait_until(lambda: b"heartbeat escalation" in log.read_bytes(), 60, "the heartbeat ladder's reconnect step")
    time.sleep(1)
    text = log.read_text()
    assert "registration refused by the control plane: check the device id and key" in text, text[-3000:]
    assert "control plane unreachable" not in text, text[-3000:]
    assert "wifi reconnect skipped: the control plane answers" in text, text[-3000:]
    assert "wifi down" not in text, text[-3000:]
