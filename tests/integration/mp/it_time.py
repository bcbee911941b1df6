# Time (protocol §7): TimeSyncManager against the SNTP responder of `picoiot server --sntp-port`, advertised to the
# device as services.ntp at registration.
from iotlib.compat import epoch_ms
from iotlib.timesync import TimeSyncManager
from it_device import Device

HOUR_MS = 3600 * 1000


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    ntp = dev.auth.services["ntp"]
    assert ntp and ntp.startswith("127.0.0.1:"), dev.auth.services

    # 1. same host, same clock: the offset is about zero and the round trip short
    ts = TimeSyncManager([ntp])
    assert await ts.sync(), ts.last_error
    assert ts.synced and ts.server is not None and abs(ts.offset_ms) < 1000, (ts.offset_ms, ts.delay_ms)
    # delay = (t4 - t1) - (t3 - t2): with the device's millisecond clock it can come out as -1 on loopback
    assert -2 < ts.delay_ms < 1000, ts.delay_ms

    # 2. a device clock an hour slow: the offset measures exactly that, and now_ms() corrects it
    slow = TimeSyncManager([ntp], clock=lambda: epoch_ms() - HOUR_MS)
    assert await slow.sync(), slow.last_error
    assert abs(slow.offset_ms - HOUR_MS) < 1000, slow.offset_ms
    assert abs(slow.now_ms() - epoch_ms()) < 1000

    # 3. nobody answering: a clear failure and the timesync.failed alarm; then the good server is used
    alarms = []
    dead = TimeSyncManager(["127.0.0.1:%d" % ctl.ask("unused_udp_port")], on_alarm=lambda *a: alarms.append(a))
    dead.timeout_ms = 300
    assert not await dead.sync()
    assert not dead.synced and dead.last_error, dead.last_error
    assert alarms and alarms[-1][0] == "timesync.failed", alarms
    dead.configure(servers=[dead.servers[0], ntp])
    assert await dead.sync() and dead.synced
    return {"offset_ms": ts.offset_ms, "delay_ms": ts.delay_ms}
