# Config (protocol §3): ConfigManager against the real ConfigurationServer — the relays type's defaults fetched and
# applied through the relay bank's hot-reload callback; an operator's change wakes the blocking query; a config the
# server accepts but the device refuses is reported `rejected` and the last-known-good stays (memory and flash).
from iotlib.compat import asyncio
from iotlib.config import ConfigManager
from iotlib.relays import RelayBank
from it_device import Device, BOARD_RELAYS, contains, read_json, relays_config


def manager(path, bank, calls):
    """The relays controller's ConfigManager wiring: its schema and defaults, the relay bank as hot-reload callback
    (built-in relays while the config names none)."""
    schema, defaults = relays_config()
    cm = ConfigManager(schema, defaults, path=path)
    cm.load()
    bank.configure(cm.config["relays"] or BOARD_RELAYS)

    def reload_relays(section):
        calls.append(section)
        bank.configure(section or BOARD_RELAYS)
    cm.on_change("relays", reload_relays)
    return cm


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    path = p["flash"] + "/config.json"
    bank = RelayBank()
    calls = []
    cm = manager(path, bank, calls)
    url = dev.url("config")

    # 1. first contact: the type's defaults, version 1, applied and reported
    changed, reason = await cm.fetch(dev.http, url, dev.token)
    srv = ctl.ask("config_show")
    assert srv["version"] >= 1 and cm.version == srv["version"], (cm.version, srv)
    assert contains(cm.config, srv["config"]) == [], contains(cm.config, srv["config"])
    assert srv["report"]["version"] == cm.version and srv["report"]["status"] == "applied", srv["report"]
    assert (await cm.fetch(dev.http, url, dev.token)) == (False, "not modified")  # If-None-Match → 304
    v1 = cm.version

    # 2. blocking query woken by the operator's change → applied (hot reload) and reported
    ctl.ask("when_waiting", kind="config", then="patch_config",
            args={"overrides": {"relays": {"relay1": {"active_low": True}}}})
    changed, reason = await asyncio.wait_for(cm.fetch(dev.http, url, dev.token, wait=30), 25)
    assert changed, reason
    assert cm.version == v1 + 1 and cm.config["relays"]["relay1"]["active_low"] is True
    assert calls and calls[-1]["relay1"]["active_low"] is True
    assert bank.describe("relay1")["active_low"] is True
    srv = ctl.ask("config_show")
    assert srv["report"] == {"version": v1 + 1, "status": "applied", "reason": None, "ts": srv["report"]["ts"]}, srv
    good = cm.version

    # 3. accepted by the server (pin 0-28), refused by the device: GPIO 23 is wired to the Wi-Fi chip
    v3 = ctl.ask("patch_config", overrides={"relays": {"relay2": {"pin": 23}}})["version"]
    changed, reason = await cm.fetch(dev.http, url, dev.token, wait=30)
    assert not changed and "relays.relay2.pin" in reason, reason
    assert cm.version == good and cm.config["relays"]["relay2"]["pin"] == 3
    assert bank.describe("relay2")["pin"] == 3  # rolled back
    assert read_json(path)["version"] == good
    srv = ctl.ask("config_show")
    assert srv["report"]["version"] == v3 and srv["report"]["status"] == "rejected", srv["report"]
    assert "relays.relay2.pin" in srv["report"]["reason"], srv["report"]
    # the rejected version is not applied again, and a long-poll waits for the *next* version
    assert (await cm.fetch(dev.http, url, dev.token))[0] is False

    # 4. a key the server's schema allows but the device's does not know (a typo) is refused too
    v4 = ctl.ask("patch_config", overrides={"relays": {"relay2": {"pin": 3, "pulse_sm": 5}}})["version"]
    changed, reason = await cm.fetch(dev.http, url, dev.token, wait=30)
    assert not changed and "relays.relay2.pulse_sm" in reason, reason
    srv = ctl.ask("config_show")
    assert srv["report"]["version"] == v4 and srv["report"]["status"] == "rejected", srv["report"]

    # 5. two relays on one pin: the server's schema leaves that to the device (docs/control-plane.md, Device types)
    v5 = ctl.ask("patch_config", overrides={"relays": {"relay2": {"pin": 2, "pulse_sm": None}}})["version"]
    changed, reason = await cm.fetch(dev.http, url, dev.token, wait=30)
    assert not changed and "relays.relay2.pin" in reason and "already used" in reason, reason
    srv = ctl.ask("config_show")
    assert srv["report"]["version"] == v5 and srv["report"]["status"] == "rejected", srv["report"]
    assert cm.config["relays"]["relay2"]["pin"] == 3

    # 6. fixed by the operator → applied
    v6 = ctl.ask("patch_config", overrides={"relays": {"relay2": {"pin": 3, "max_on_s": 60}},
                                            "failsafe_after_s": 30})["version"]
    changed, reason = await cm.fetch(dev.http, url, dev.token, wait=30)
    assert changed and cm.version == v6 and bank.describe("relay2")["max_on_s"] == 60, (reason, cm.version)
    assert cm.config["failsafe_after_s"] == 30
    assert ctl.ask("config_show")["report"]["status"] == "applied"

    # 7. reboot: the last-known-good comes back from flash
    again = manager(path, RelayBank(), [])
    assert again.version == v6 and again.config == cm.config
    return {"version": cm.version, "applied": cm.applied, "failures": cm.failures}
