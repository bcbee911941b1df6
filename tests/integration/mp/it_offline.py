# Liveness (protocol §5): a device that stops heartbeating goes offline after its TTL with a `device_offline` alarm;
# its next heartbeat brings it back online and resolves the alarm.
from iotlib.watchdog import WatchdogManager
from it_device import Device


async def main(ctl):
    p = ctl.ask("setup", overrides={"heartbeat_interval_s": 1})
    dev = Device(p)
    await dev.register()
    ttl = dev.auth.intervals["ttl"]
    assert dev.auth.intervals["heartbeat"] == 1 and ttl <= 3, dev.auth.intervals
    wd = WatchdogManager()
    wd.heartbeat(dev.send_heartbeat, payload=lambda: {"firmware": "0.1.0"})
    assert await wd.beat(), wd.stats()
    off = ctl.ask("wait_offline")  # the device is silent meanwhile
    assert off["alarm"]["state"] == "firing" and off["alarm"]["severity"] == "error", off
    assert await wd.beat()
    back = ctl.ask("wait_online")
    assert back["alarm"]["state"] == "resolved" and back["alarm"]["count"] == 1, back
    return {"ttl": ttl, "acks": wd.acks}
