# main_sim.make: settings → controller (the OTA key must reach the device, or simulated devices never check for updates)
import main_sim

_BASE = {"device_id": "r-1", "device_key": "k" * 64, "service_discovery_url": "http://127.0.0.1:1/api/devices",
         "host": "127.0.0.1", "port": 18999, "flash_dir": "/tmp/unused"}


def _settings(**extra):
    s = dict(_BASE)
    s.update(extra)
    s["kind"] = s.get("kind", "relays")
    return s


def test_ota_public_key_reaches_the_controller():
    ctl = main_sim.make(_settings(ota_public_key="ab" * 32))
    assert ctl.ota_public_key == "ab" * 32


def test_without_key_ota_stays_disabled():
    ctl = main_sim.make(_settings())
    assert ctl.ota_public_key is None
