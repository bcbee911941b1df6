# Alarms (protocol §6): AlarmManager.flush delivers deduplicated alarms; when the answer is lost on the way back
# (the server did store the batch) the device retries the identical batch and the server does not count it twice.
from iotlib.alarms import AlarmManager
from iotlib.http import HTTPError
from it_device import Device

KEY = "sensor.bme280"


def server_alarm(ctl, key=KEY):
    rows = ctl.ask("alarms", key=key)
    assert len(rows) == 1, rows
    return rows[0]


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    am = AlarmManager(path=p["flash"] + "/alarms")
    url = dev.url("alarms")

    # 1. three firings of one key → one alarm with count 3
    for _ in range(3):
        am.fire(KEY, "warning", "I2C read failed")
    am.fire("boot", "info", "booted")
    assert await am.flush(dev.http, url, dev.token) is True and am.pending() == 0
    a = server_alarm(ctl)
    assert (a["count"], a["state"], a["severity"], a["message"]) == (3, "firing", "warning", "I2C read failed"), a
    mine = am.get(KEY)
    assert a["first_ts"] == mine["first_ts"] and a["last_ts"] == mine["last_ts"], (a, mine)
    assert server_alarm(ctl, "boot")["severity"] == "info"

    # 2. the answer to the next batch is lost: the server stored it, the device saw a transport error
    am.fire(KEY, "warning", "I2C read failed")
    base = ctl.ask("proxy", drop_next=1)
    lossy = base + url[url.index("/api/"):]
    assert await am.flush(dev.http, lossy, dev.token) is False
    assert am.pending() == 1 and am.last_error and "HTTPError" in am.last_error, am.last_error
    assert server_alarm(ctl)["count"] == 4  # it did arrive
    # the retry sends the identical batch (running count 4): still 4, not 8 or 5
    assert await am.flush(dev.http, lossy, dev.token) is False  # backoff honoured without force
    assert await am.flush(dev.http, lossy, dev.token, force=True) is True
    assert ctl.ask("proxy_stats") == {"forwarded": 2, "dropped": 1}
    a = server_alarm(ctl)
    assert a["count"] == 4 and a["episodes"] == 1, a

    # 3. resolved, then firing again: a second episode adds up (4 + 1)
    am.clear(KEY)
    assert await am.flush(dev.http, url, dev.token)
    assert server_alarm(ctl)["state"] == "resolved"
    am.fire(KEY, "error", "I2C bus stuck")
    assert await am.flush(dev.http, url, dev.token)
    a = server_alarm(ctl)
    assert (a["count"], a["episodes"], a["state"], a["severity"]) == (5, 2, "firing", "error"), a

    # 4. an exception report (message + masked traceback tail) fits the server's limits
    try:
        raise OSError(5, "EIO")
    except OSError as e:
        am.report_exception("task.sensors", e)
    assert await am.flush(dev.http, url, dev.token)
    assert "OSError" in server_alarm(ctl, "task.sensors")["message"]
    return {"sent": am.sent}
