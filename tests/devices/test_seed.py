"""The seed's own usage examples, as written (its exact keyword arguments, ending with `await controller.main()`), run
under the unix micropython against the real control plane. The placeholders are filled in, and two lines before the
example set up the simulated board: its flash directory, and the host port standing in for the controllers' default
port 80 (privileged on a host)."""
import textwrap

import pytest

from devtest import BASE_CONFIG, BUNDLE, HEAP, NS, RUNTIME, wait_until
from picoiot.procs import DeviceChild, device_settings, free_port, provision_over_api
from picoiot.server.auth import device_local_token

# The seed's "Usage Examples", verbatim but for the indentation its markdown lost.
SEED = {
    "sensors": '''
        import uasyncio as asyncio
        from sensors_controller import SensorsController
        async def run():
            controller = SensorsController(
                wifi_ssid="<your_wifi_ssid>",
                wifi_password="<your_wifi_password>",
                device_id="<unique_device_id>",
                device_key="<your_device_key>",
                service_discovery_url="https://<service_discovery_host>/api/devices"
            )
            await controller.main()
        asyncio.run(run())
        ''',
    "relays": '''
        import uasyncio as asyncio
        from relays_controller import RelaysController
        async def run():
            relay_pins = {"relay1": 2, "relay2": 3} # Example: GPIO2 and GPIO3
            controller = RelaysController(
                wifi_ssid="<your_wifi_ssid>",
                wifi_password="<your_wifi_password>",
                device_id="<unique_device_id>",
                device_key="<your_device_key>",
                service_discovery_url="https://<service_discovery_host>/api/devices",
                relay_pins=relay_pins
            )
            await controller.main()
        asyncio.run(run())
        ''',
}

pytestmark = pytest.mark.skipif(RUNTIME != "micropython", reason="the seed's examples are for the unix port")


class SeedDevice:
    def __init__(self, cp, tmp, kind):
        self.id = f"seed-{kind}"
        key = provision_over_api(cp.url, cp.token(), self.id, kind, NS, overrides=BASE_CONFIG)
        assert key is not None
        self.key = key["device_key"]
        port = free_port()
        flash = tmp / f"{self.id}.flash"
        settings = device_settings(tmp / f"{self.id}.json", key, kind, port, flash)
        text = textwrap.dedent(SEED[kind]).strip()
        for placeholder, value in (("<your_wifi_ssid>", "sim-ap"), ("<your_wifi_password>", "sim-password"),
                                   ("<unique_device_id>", self.id), ("<your_device_key>", self.key),
                                   ("https://<service_discovery_host>/api/devices", key["service_discovery_url"])):
            assert placeholder in text
            text = text.replace(placeholder, value)
        board = f"import picosim as sim\nsim.configure(flash_root={str(flash)!r}, port_map={{80: {port}}})\n"
        scripts = tmp / f"{self.id}-script"
        scripts.mkdir()
        (scripts / f"seed_{kind}.py").write_text(board + text + "\n")
        self.child = DeviceChild(settings, runtime="micropython", heap=HEAP[kind], bundle=BUNDLE,
                                 log=tmp / f"{self.id}.log", entry=f"seed_{kind}", extra_path=scripts)
        self.url = self.child.url

    def get(self, path, role="viewer"):
        import httpx
        tok = device_local_token(self.key, self.id, role, 3600, sub=f"test-{role}")
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {tok}"}, timeout=10)


@pytest.fixture
def seed_device(cp, bundle, tmp_path):
    started = []

    def make(kind):
        d = SeedDevice(cp, tmp_path, kind)
        started.append(d)
        d.child.start()
        d.child.wait_ready(90)
        return d
    try:
        yield make
    finally:
        for d in started:
            d.child.stop()


def test_the_seeds_relays_example_drives_its_pins_and_refuses_a_config_that_moves_them(seed_device, cp):
    dev = seed_device("relays")
    assert cp.device(dev.id)["registered_ts"]
    pins = {r["name"]: r["pin"] for r in dev.get("/gpio").json()["relays"]}
    assert pins == {"relay1": 2, "relay2": 3}, pins

    # the control plane would move relay1 to GPIO16: refused, with a reason the operator sees, and nothing moves
    v = cp.patch_config(dev.id, {"relays": {"relay1": {"pin": 16}}})

    def report():
        rep = cp.device(dev.id).get("config_report") or {}
        return rep if rep.get("version") == v else None
    rep = wait_until(report, 60, "the device's verdict on the config that moves relay1")
    assert rep["status"] == "rejected", rep
    assert "relays.relay1.pin" in rep["reason"] and "GPIO2" in rep["reason"], rep
    pins = {r["name"]: r["pin"] for r in dev.get("/gpio").json()["relays"]}
    assert pins == {"relay1": 2, "relay2": 3}, pins

    # a config that keeps the wiring is applied, and the cloud switches the relay
    v = cp.patch_config(dev.id, {"relays": {"relay1": {"pin": 2, "max_on_s": 60}}})
    wait_until(lambda: (cp.device(dev.id).get("config_report") or {}).get("version") == v, 60, "the next config")
    assert cp.device(dev.id)["config_report"]["status"] == "applied"
    cp.desire(dev.id, {"relay2": "on"})
    wait_until(lambda: dev.get("/gpio/relay2").json()["state"] == "on", 60, "the desired relay2=on")


def test_the_seeds_sensors_example_streams(seed_device, cp):
    dev = seed_device("sensors")
    assert cp.device(dev.id)["registered_ts"]
    r = dev.get("/sensors")
    assert r.status_code == 200 and "values" in r.json(), r.text
