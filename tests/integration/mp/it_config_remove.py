# A key the operator removes (null override, protocol §3: "a null in an override removes the key") must be gone from
# the device's applied config too — e.g. a relay taken out of service must not keep running on the device.
from iotlib.config import ConfigManager
from iotlib.relays import RelayBank
from it_device import Device, RELAYS_SCHEMA, RELAYS_DEFAULTS


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    bank = RelayBank()
    cm = ConfigManager(RELAYS_SCHEMA, RELAYS_DEFAULTS)
    bank.configure(cm.config["relays"])
    cm.on_change("relays", bank.configure)
    assert (await cm.fetch(dev.http, dev.url("config"), dev.token))[0]
    v = ctl.ask("patch_config", overrides={"relays": {"relay2": None}})["version"]
    changed, reason = await cm.fetch(dev.http, dev.url("config"), dev.token)
    srv = ctl.ask("config_show")
    assert srv["version"] == v and sorted(srv["config"]["relays"]) == ["relay1"], srv
    assert srv["report"]["status"] == "applied" and cm.version == v, (srv["report"], reason)
    assert sorted(cm.config["relays"]) == ["relay1"], "device still runs " + str(sorted(cm.config["relays"]))
    assert bank.names() == ["relay1"], bank.names()
    return {"version": cm.version}
