# Degraded mode: the control plane is stopped mid-session. Every call fails with HTTPError, the
# device buffers its state reports and alarms; after the restart it re-syncs full documents (acting on a desired
# change made meanwhile) and delivers everything it buffered — nothing lost, nothing counted twice.
from iotlib.alarms import AlarmManager
from iotlib.config import ConfigManager
from iotlib.http import HTTPError
from iotlib.relays import RelayBank
from iotlib.state import StateManager
from iotlib.watchdog import WatchdogManager
from it_device import Device, relay_delta_handler, relays_config, BOARD_RELAYS


async def fails(coro):
    try:
        await coro
    except HTTPError as e:
        return str(e)
    raise AssertionError("expected HTTPError while the control plane is down")


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p, timeout_ms=5000)
    await dev.register()
    bank = RelayBank()
    bank.configure(BOARD_RELAYS)
    schema, defaults = relays_config()
    cm = ConfigManager(schema, defaults, path=p["flash"] + "/config.json")
    assert (await cm.fetch(dev.http, dev.url("config"), dev.token))[0]
    sm = StateManager(dev.http, dev.auth)
    sm.on_delta(relay_delta_handler(bank))
    await sm.sync_full()
    am = AlarmManager(path=p["flash"] + "/alarms")
    wd = WatchdogManager()
    wd.heartbeat(dev.send_heartbeat, payload=lambda: {"config_version": cm.version, "state_version": sm.version})
    assert await wd.beat()

    ctl.ask("stop_server")
    why = await fails(cm.fetch(dev.http, dev.url("config"), dev.token))
    assert "127.0.0.1" in why, why
    sm.report({"temp": 21})
    await fails(sm.flush())
    assert not sm.online and sm.need_full and sm.pending() == [{"temp": 21}], sm.pending()
    await bank.set("relay2", "on")  # switched locally (device REST API) while cut off
    sm.report({"relay2": "on"})
    for _ in range(2):
        am.fire("cloud.unreachable", "error", "control plane unreachable")
    am.fire("sensor.bme280", "warning", "I2C read failed")
    assert await am.flush(dev.http, dev.url("alarms"), dev.token) is False
    assert am.pending() == 2 and "HTTPError" in am.last_error, am.last_error
    assert not await wd.beat() and wd.missed == 1
    assert cm.version == 1 and bank.state("relay2") == "on"  # still running on last-known-good

    ctl.ask("start_server")
    ctl.ask("set_desired", desired={"relay1": "on"})  # changed while the device was not listening
    await sm.sync_full()  # full document first, then the buffered reports
    assert bank.state("relay1") == "on" and sm.pending() == [] and sm.online
    assert await am.flush(dev.http, dev.url("alarms"), dev.token, force=True) and am.pending() == 0
    assert await wd.beat() and wd.missed == 0
    assert (await cm.fetch(dev.http, dev.url("config"), dev.token)) == (False, "not modified")
    await dev.register()  # registration works again too (fresh nonce)

    doc = ctl.ask("shadow")
    assert doc["state"]["reported"] == {"relay1": "on", "relay2": "on", "temp": 21}, doc
    assert doc["state"]["delta"] == {} and doc["version"] == sm.version, doc
    counts = {}
    for a in ctl.ask("alarms"):
        counts[a["key"]] = a["count"]
    assert counts == {"cloud.unreachable": 2, "sensor.bme280": 1}, counts
    return {"missed_total": wd.missed_total, "full_syncs": sm.full_syncs}
