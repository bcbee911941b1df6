# iotlib.settings: the board settings file main.py reads. Every bad file is one SettingsError naming the field,
# never carrying a value (the password, the key) and never shaped "name: value" (the log would mask the field name).
import json
import fwtest
import peers
from iotlib import settings as S
from iotlib import log

_CA_B64 = peers.TEST_CA_B64
_KEY = "k" * 64
_PW = "wifi-secret-pw"


def _good(**kw):
    d = {"version": 1, "kind": "relays", "device_id": "dev-1", "device_key": _KEY,
         "service_discovery_url": "https://cp.example:8443/api/devices", "wifi": [{"ssid": "home", "password": _PW}],
         "ca": _CA_B64, "controller": {"relay_pins": {"pump": 2, "fan": 3}}}
    d.update(kw)
    return d


def _err(d):
    e = fwtest.raises(S.SettingsError, S.validate, d)
    msg = str(e)
    assert _PW not in msg and _KEY not in msg, msg
    assert log.mask_text(msg) == msg, msg  # nothing in it looks like a secret to the log
    return msg


def test_a_good_file_is_normalised():
    s = S.validate(_good(wifi=[{"ssid": "home", "password": _PW}, {"ssid": "cafe", "password": ""}],
                         api_tokens=[{"sha256": "A" * 64, "role": "operator"}]))
    assert s["wifi"] == [("home", _PW), ("cafe", "")]
    assert s["ca"][0] == 0x30 and len(s["ca"]) > 64  # DER bytes for the TLS context
    assert s["controller"]["relay_pins"] == {"pump": 2, "fan": 3}
    assert s["controller"]["config"]["api"]["tokens"] == [{"sha256": "A" * 64, "role": "operator"}]
    assert s["port"] == 80 and s["host"] == "0.0.0.0" and s["namespace"] == "default"
    assert s["log"]["file"] is True


def test_missing_fields_are_named():
    for k in ("kind", "device_id", "device_key", "service_discovery_url", "wifi"):
        d = _good()
        del d[k]
        assert _err(d) == k + " is missing"


def test_wrong_types_are_named():
    assert _err(_good(device_id=7)).startswith("device_id must be a string")
    assert _err(_good(wifi=[{"ssid": "home", "password": "short"}])).startswith("wifi[0].password must be")
    assert _err(_good(wifi=[{"ssid": 5}])).startswith("wifi[0].ssid must be")
    assert _err(_good(port="80")).startswith("port must be an integer")
    assert _err(_good(ota_public_key="xyz")).startswith("ota_public_key must be 64 hex")
    assert _err(_good(api_tokens=[{"sha256": "0" * 64, "role": "root"}])).startswith("api_tokens[0].role must be")
    assert _err(_good(colour="red")) == "colour is not a known field"


def test_unknown_kind_and_bad_pins_are_refused():
    assert _err(_good(kind="lamp")).startswith("kind must be")
    assert "GPIO23" in _err(_good(controller={"relay_pins": {"pump": 23}}))  # the Wi-Fi chip's
    assert "already used" in _err(_good(controller={"relay_pins": {"pump": 2, "fan": 2}}))
    assert _err(_good(controller={"relay_pins": {"pump": 40}})).startswith("controller.relay_pins.pump must be")
    m = _err(_good(kind="sensors", controller={"config": {"i2c": {"sda": 4, "scl": 25}}}))
    assert m.startswith("controller.config.i2c.scl cannot be GPIO25"), m
    assert _err(_good(controller={"pins": []})).startswith("controller.pins is not an argument")


def test_https_needs_a_ca():
    d = _good()
    del d["ca"]
    assert _err(d).startswith("ca is missing")
    assert _err(_good(ca="bm90IGEgY2VydGlmaWNhdGUgYXQgYWxsLCBqdXN0IHNvbWUgdGV4dCB0aGF0IGlzIGxvbmcgZW5vdWdo")) \
        .startswith("ca is not a DER certificate")
    d["service_discovery_url"] = "http://cp.example/api/devices"
    assert S.validate(d)["ca"] is None


def test_read_says_what_is_wrong_with_the_file():
    path = fwtest.tmpdir("settings") + "/settings.json"
    assert "missing or unreadable" in str(fwtest.raises(S.SettingsError, S.read, path))
    with open(path, "w") as f:
        f.write(json.dumps(_good())[:40])  # a copy cut short
    assert "not valid JSON" in str(fwtest.raises(S.SettingsError, S.read, path))
