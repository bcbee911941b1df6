# The device's wall clock (iotlib.compat): a board's RTC reads 2021 until the registration answer or SNTP sets it;
# until then log lines are marked unsynced instead of dated 2021, and alarm timestamps taken meanwhile move with the
# first step, so the control plane gets today's date.
import json
from iotlib import compat, log, timesync
from iotlib.alarms import AlarmManager

RTC_2021 = 1609459200000  # what rp2's RTC reads at power-on
TODAY = 1796000000000


class _Lines:
    def __init__(self):
        self.buf = []

    def write(self, s):
        if s != "\n":
            self.buf.append(s)


def _rtc():
    t = [RTC_2021]

    def read():
        t[0] += 1
        return t[0]
    return read


def _restore():
    compat._clk[0] = None
    compat._clk[1] = 0
    compat._clk[2] = True
    log.configure()


def test_unsynced_until_set_clock_then_stepped():
    try:
        timesync.clock_unsynced(_rtc())
        assert not compat._clk[2] and compat.epoch_ms() < RTC_2021 + 1000
        step = timesync.set_clock(TODAY)
        assert compat._clk[2] and TODAY - RTC_2021 - 10 < step <= TODAY - RTC_2021
        assert TODAY <= compat.epoch_ms() < TODAY + 1000
    finally:
        _restore()


def test_log_lines_before_the_first_sync_are_marked_not_dated():
    lines = _Lines()
    try:
        timesync.clock_unsynced(_rtc())
        log.configure(console=lines)
        log.get("t").info("booting")
        timesync.set_clock(TODAY)
        log.get("t").info("synced")
        first, second = [json.loads(x) for x in lines.buf]
        assert first["ts"] is None and isinstance(first["up_ms"], int) and first["msg"] == "booting"
        assert TODAY <= second["ts"] < TODAY + 1000 and "up_ms" not in second
    finally:
        _restore()


def test_alarm_timestamps_taken_before_the_sync_move_with_the_step():
    try:
        timesync.clock_unsynced(_rtc())
        am = AlarmManager()
        am.fire("sensor.bme280", "warning", "I2C read failed")
        am.fire("sensor.bme280", "warning", "I2C read failed")
        am.fire("wifi.weak", "info", "rssi low")
        am.clear("wifi.weak")
        step = timesync.set_clock(TODAY)
        am.clock_stepped(step)
        am.fire("after.sync", "info", "later")
        batch = {k: am._alarms[k].wire() for k in am._alarms}
        for k in ("sensor.bme280", "wifi.weak", "after.sync"):
            a = batch[k]
            assert TODAY - 1000 < a["first_ts"] <= a["last_ts"] < TODAY + 1000, (k, a)
        # a second step (an SNTP correction later) moves nothing again
        am.clock_stepped(5000)
        assert batch["sensor.bme280"]["first_ts"] == am._alarms["sensor.bme280"].wire()["first_ts"]
    finally:
        _restore()
