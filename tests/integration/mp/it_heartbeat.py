# Heartbeat (protocol §5): WatchdogManager.beat() through the device's sender against the real heartbeat endpoint —
# `pending` reflects operator changes and the device fetches only what is newer; with `wait` the heartbeat is a
# long-poll that an operator's change answers at once.
from iotlib.compat import asyncio
from iotlib.config import ConfigManager
from iotlib.state import StateManager
from iotlib.watchdog import WatchdogManager
from it_device import Device, relays_config


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    cm = ConfigManager(*relays_config())
    await cm.fetch(dev.http, dev.url("config"), dev.token)
    sm = StateManager(dev.http, dev.auth)
    deltas = []
    sm.on_delta(lambda d: (deltas.append(d), d)[1])  # "applies" the delta by reporting it
    await sm.sync_full()
    answers = []
    wd = WatchdogManager()
    wd.heartbeat(dev.send_heartbeat, on_answer=answers.append,
                 payload=lambda: {"config_version": cm.version, "state_version": sm.version, "firmware": "0.1.0",
                                  "reconnects": 0, "rssi": -60})

    # 1. nothing pending: the answer acks our seq and echoes what we hold
    assert await wd.beat(), wd.stats()
    a = answers[-1]
    assert a["ack"] == wd.seq and a["ttl"] == dev.auth.intervals["ttl"], a
    assert a["pending"] == {"config_version": cm.version, "state_version": sm.version, "ota": None}, a

    # 2. operator changes config and desired state → pending says so → the device fetches exactly those
    cv = ctl.ask("patch_config", overrides={"log": {"level": "debug"}})["version"]
    sv = ctl.ask("set_desired", desired={"relay1": "on"})["version"]
    assert await wd.beat()
    pend = answers[-1]["pending"]
    assert pend["config_version"] == cv and pend["state_version"] == sv, (pend, cv, sv)
    assert pend["config_version"] > cm.version
    changed, reason = await cm.fetch(dev.http, dev.url("config"), dev.token)
    assert changed and cm.version == cv and cm.config["log"]["level"] == "debug", reason
    sm.notify(pend["state_version"])
    assert sm.need_fetch
    await sm.fetch()
    assert deltas[-1] == {"relay1": "on"}, deltas
    await sm.flush()
    assert await wd.beat()
    assert answers[-1]["pending"] == {"config_version": cm.version, "state_version": sm.version, "ota": None}
    d = ctl.ask("device")
    assert d["online"] and d["heartbeat"]["seq"] == wd.seq and d["heartbeat"]["config_version"] == cm.version, d

    # 3. heartbeat as a long-poll: answered as soon as the operator changes something
    dev.hb_wait = 20
    wd.set_heartbeat_interval(10000, timeout_ms=35000)
    ctl.ask("when_waiting", kind="heartbeat", then="set_desired", args={"desired": {"relay2": "on"}})
    assert await asyncio.wait_for(wd.beat(), 18)  # would be held 20 s if nothing woke it
    assert answers[-1]["pending"]["state_version"] == sm.version + 1, (answers[-1], sm.version)
    return {"acks": wd.acks, "missed": wd.missed_total}
