import json
import fwtest
import picosim as sim
from iotlib import hal, log
from iotlib.compat import asyncio
from iotlib.net import NetworkManager

PASSWORD = "hunter2-wifi"


class _Lines:
    def __init__(self):
        self.buf = []

    def write(self, s):
        if s != "\n":  # the logger writes each line, then its newline
            self.buf.append(s)

    def records(self):
        return [json.loads(l) for l in self.buf]

    def text(self):
        return "".join(self.buf)


def _setup(**attrs):
    """A fresh manual-clock board, a NetworkManager whose sleeps only move that clock, and a log capture."""
    b = sim.configure(flash_root=fwtest.tmpdir("flash"), clock="manual")
    slept = []

    async def sleep(ms):
        slept.append(ms)
        b.advance(ms)
        await asyncio.sleep(0)

    lines = _Lines()
    log.configure(level="debug", console=lines)
    nm = NetworkManager("lab", PASSWORD, sleep_ms=sleep)
    for k in attrs:
        setattr(nm, k, attrs[k])
    return b, nm, slept, lines


def _done():
    log.configure()


async def _until(cond, limit=3000):
    for _ in range(limit):
        if cond():
            return True
        await asyncio.sleep(0.001)
    return False


def test_connects_with_power_save_off_and_reports_up():
    b, nm, slept, lines = _setup()
    events = []
    nm.on_change(events.append)
    assert fwtest.run(nm.connect()) is True
    assert nm.is_up and events == [True]
    assert ("pm", 0xA11140) in b.wlan.config_log and b.wlan.config("pm") == 0xA11140
    s = nm.stats()
    assert s["up"] and s["ip"] == "192.168.4.23" and s["rssi"] == -58 and s["connects"] == 1
    assert s["reconnects"] == 0 and s["failures"] == 0 and s["status_name"] == "up"
    assert slept == [nm.poll_ms, nm.poll_ms]  # joining -> no_ip -> up
    assert PASSWORD not in lines.text() and PASSWORD not in json.dumps(s)
    _done()


def test_every_cyw43_status_gets_a_log_line_and_an_outcome():
    b, nm, slept, lines = _setup()
    b.wlan.script([1, -1], [1, -2], [1, -3], [0, 1, 2, 3])
    assert fwtest.run(nm.connect()) is True
    recs = lines.records()
    reasons = [r.get("reason") for r in recs if "reason" in r]
    for name in ("connect_fail", "no_ap_found", "wrong_password", "idle", "joining", "no_ip"):
        assert name in reasons, name
    failed = [r for r in recs if r["msg"] == "wifi connect failed"]
    assert [r["status"] for r in failed] == [-1, -2, -3]
    assert all(r["level"] == "error" for r in failed)
    assert "password" in [r for r in failed if r["status"] == -3][0]["detail"]
    up = [r for r in recs if r["msg"] == "wifi up"]
    assert len(up) == 1 and up[0]["status"] == 3
    assert nm.failures == 3 and nm.attempts == 4 and nm.connects == 1
    # the delays before attempts 2, 3 and 4: doubling, and the longest after a wrong password
    retries = [r["delay_ms"] for r in recs if r["msg"] == "wifi retry scheduled"]
    assert 500 <= retries[0] <= 1000 and 1000 <= retries[1] <= 2000 and 30000 <= retries[2] <= 60000
    assert PASSWORD not in lines.text()
    _done()


def test_backoff_is_capped_exponential_with_jitter():
    _, nm, _, _ = _setup()
    for f in range(1, 40):
        full = min(nm.backoff_max_ms, nm.backoff_base_ms * 2 ** (f - 1))
        for _ in range(3):
            d = nm.backoff_ms(f)
            assert full // 2 <= d <= full, (f, d)
    capped = [nm.backoff_ms(30) for _ in range(20)]
    assert len(set(capped)) > 1  # jittered, not lockstep
    _done()


def test_gives_up_after_attempts_when_stuck_joining():
    b, nm, slept, lines = _setup(connect_timeout_ms=1000)
    b.wlan.fallback = [1]  # the AP never answers
    assert fwtest.run(nm.connect(attempts=2)) is False
    assert not nm.is_up and nm.failures == 2 and nm.attempts == 2
    assert b.wlan.status() == 0  # the manager left the driver idle
    detail = [r["detail"] for r in lines.records() if r["msg"] == "wifi connect failed"]
    assert detail[0] == "no connection after 1000 ms (stuck at joining)"
    assert slept.count(nm.poll_ms) == 2 * 1000 // nm.poll_ms
    _done()


def test_connect_error_and_missing_power_management_are_survived():
    b, nm, slept, lines = _setup()

    class NoPM:  # a driver without cyw43 power management
        def __getattr__(self, name):
            return getattr(b.wlan, name)

        def config(self, **kw):
            raise ValueError("unknown config param")

    nm._wlan = NoPM()
    b.wlan.script(OSError(-1))
    assert fwtest.run(nm.connect()) is True
    assert nm.failures == 1 and nm.is_up
    assert "connect() raised OSError" in [r for r in lines.records() if r["msg"] == "wifi connect failed"][0]["detail"]
    _done()


def test_silent_link_death_is_found_through_failed_io_and_healed():
    b, nm, _, lines = _setup(check_ms=1)
    events = []
    nm.on_change(events.append)

    async def main():
        task = asyncio.create_task(nm.run())
        assert await _until(lambda: nm.is_up)
        b.wlan.kill_link()
        # the driver still says all is well
        assert nm.check() and b.wlan.isconnected()
        fails = 0
        for _ in range(2):
            try:
                hal.link_check()
            except OSError:
                fails += 1
                nm.io_failed()
        nm.io_ok()  # one success in between resets the count
        for _ in range(2):
            try:
                hal.link_check()
            except OSError:
                fails += 1
                nm.io_failed()
        assert nm.is_up and fails == 4
        try:
            hal.link_check()
        except OSError:
            nm.io_failed()
        assert not nm.is_up  # third failure in a row: dead
        assert await _until(lambda: nm.is_up)
        hal.link_check()  # traffic flows again
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    fwtest.run(main())
    s = nm.stats()
    assert s["link_deaths"] == 1 and s["reconnects"] == 1 and s["drops"] == 1 and s["io_failures"] == 0
    assert events == [True, False, True]
    down = [r for r in lines.records() if r["msg"] == "wifi down"][0]
    assert down["reason"] == "link_dead" and down["level"] == "warning"
    _done()


def test_visible_drop_is_reconnected_by_run_after_backoff():
    b, nm, slept, lines = _setup(check_ms=1)

    async def main():
        task = asyncio.create_task(nm.run())
        assert await _until(lambda: nm.is_up)
        b.wlan.script([1, -2], [1, 2, 3])  # the AP is gone once, then back
        b.wlan.drop(-1)
        assert await _until(lambda: nm.reconnects == 1)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    fwtest.run(main())
    recs = lines.records()
    down = [r for r in recs if r["msg"] == "wifi down"]
    assert len(down) == 1 and down[0]["reason"] == "connect_fail"
    assert [r["reason"] for r in recs if r["msg"] == "wifi connect failed"] == ["no_ap_found"]
    assert nm.is_up and nm.drops == 1 and nm.failures == 1
    assert any(500 <= d <= 1000 for d in slept)  # one backoff before the attempt that worked
    _done()


def test_link_uptime_and_rssi_figures():
    b, nm, _, _ = _setup()
    b.wlan.rssi = [-40, -75]
    fwtest.run(nm.connect())
    assert nm.rssi == -40
    b.advance(5000)
    assert nm.check() and nm.rssi == -75
    assert nm.stats()["link_uptime_s"] == 5
    b.wlan.drop(0)
    assert not nm.check()
    s = nm.stats()
    assert s["link_uptime_s"] == 0 and s["total_uptime_s"] == 5 and s["status_name"] == "idle"
    _done()


def test_callback_failures_are_logged_and_async_callbacks_run():
    b, nm, _, lines = _setup()
    seen = []

    def bad(up):
        raise RuntimeError("callback bug")

    async def good(up):
        seen.append(up)

    nm.on_change(bad)
    nm.on_change(good)

    async def main():
        await nm.connect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    fwtest.run(main())
    assert nm.is_up and seen == [True]
    assert [r for r in lines.records() if r["msg"] == "on_change callback failed"][0]["error"] == \
        "RuntimeError: callback bug"
    _done()


def test_io_failures_while_down_do_not_count():
    b, nm, _, _ = _setup()
    for _ in range(5):
        nm.io_failed()
    assert nm.link_deaths == 0 and nm.io_failures == 0
    _done()


def test_reconnect_request_drops_and_restores_the_link():
    b, nm, _, lines = _setup(check_ms=1)
    events = []
    nm.on_change(events.append)

    async def main():
        task = asyncio.create_task(nm.run())
        assert await _until(lambda: nm.is_up)
        nm.reconnect()
        assert not nm.is_up and not b.wlan.active()  # the interface was power-cycled
        assert await _until(lambda: nm.is_up)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    fwtest.run(main())
    assert events == [True, False, True] and nm.reconnects == 1 and nm.link_deaths == 0
    assert [r["reason"] for r in lines.records() if r["msg"] == "wifi down"] == ["reconnect_requested"]
    _done()


def test_status_names_cover_every_cyw43_code():
    from iotlib import net
    assert [net.status_name(c) for c in range(-3, 4)] == ["wrong_password", "no_ap_found", "connect_fail", "idle",
                                                          "joining", "no_ip", "up"]
    assert net.status_name(7) == "unknown_7" and net.status_name(-4) == "unknown_-4"
    assert net._meaning(-3, "?").startswith("authentication failed") and net._meaning(9, "?") == "?"


def test_several_networks_are_tried_in_order():
    b, nm, slept, lines = _setup()
    nm = NetworkManager("home", "home-password", sleep_ms=nm._sleep_ms, networks=[("cafe", "cafe-password")])
    b.wlan.ap = ("cafe", "cafe-password")
    try:
        assert fwtest.run(nm.connect(attempts=2)) is True
        assert b.wlan.connects == ["home", "cafe"] and nm.ssid == "cafe" and nm.is_up
        assert "home-password" not in lines.text() and "cafe-password" not in lines.text()
        assert "cafe-password" not in json.dumps(nm.stats())
    finally:
        _done()


def test_the_http_clients_connects_feed_link_death_detection():
    from iotlib.http import HTTPClient, HTTPError
    b, nm, slept, lines = _setup()

    async def main():
        assert await nm.connect(attempts=1)
        http = HTTPClient(connect_timeout_ms=2000)
        http.on_io = lambda ok: nm.io_ok() if ok else nm.io_failed()  # what Device wires
        http.link_check = hal.link_check
        for _ in range(4):  # refused: the link carried the answer, so it is alive
            try:
                await http.request("GET", "http://127.0.0.1:1/")
            except HTTPError:
                pass
        assert nm.link_deaths == 0 and nm.is_up
        b.wlan.kill_link()  # isconnected() still True, nothing gets through
        for _ in range(3):
            try:
                await http.request("GET", "http://127.0.0.1:1/")
            except HTTPError:
                pass
        assert nm.link_deaths == 1 and not nm.is_up
    try:
        fwtest.run(main())
    finally:
        _done()
