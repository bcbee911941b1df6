import os
import json
import fwtest
import peers
from iotlib import alarms, log, fsutil
from iotlib.compat import asyncio, sleep_ms
from iotlib.http import HTTPError

URL = "http://cp/api/v1/devices/d1/alarms"


class Clock:
    def __init__(self, t=1795000000000):
        self.t = t

    def __call__(self):
        self.t += 1000
        return self.t


class Capture:
    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)

    def records(self):
        return [json.loads(x) for x in "".join(self.text).splitlines()]


def _logcap():
    cap = Capture()
    log.configure(level="debug", console=cap)
    return cap


class Resp:
    def __init__(self, status):
        self.status = status
        self.headers = {}


class FakeHTTP:
    """Canned answers for HTTPClient.request (unit tests only; a real server is used below)."""

    def __init__(self, answers=None, default=200, during=None):
        self.answers = list(answers or [])
        self.default = default
        self.calls = []
        self.during = during  # called while the request is "in flight"

    async def request(self, method, url, json=None, headers=None, body=None):
        self.calls.append((method, url, json, headers))
        if self.during:
            self.during()
        await sleep_ms(0)
        a = self.answers.pop(0) if self.answers else self.default
        if isinstance(a, Exception):
            raise a
        return Resp(a)


def _sent_keys(call):
    return [a["key"] for a in call[2]["alarms"]]


def test_fire_dedups_by_key_with_count_timestamps_and_latest_severity():
    am = alarms.AlarmManager(clock=Clock())
    assert am.fire("sensor.bme280", "warning", "I2C read failed") == 1
    assert am.fire("sensor.bme280", "warning", "I2C read failed") == 2
    assert am.fire("sensor.bme280", "error", "I2C bus stuck") == 3
    a = am.get("sensor.bme280")
    assert a == {"key": "sensor.bme280", "severity": "error", "message": "I2C bus stuck", "count": 3,
                 "first_ts": 1795000001000, "last_ts": 1795000003000, "state": "firing"}
    assert am.stats()["held"] == 1 and am.firing() == 1


def test_clear_resolves_and_refire_starts_a_new_episode():
    am = alarms.AlarmManager(clock=Clock())
    am.fire("wifi", "warning", "link down")
    am.fire("wifi", "warning", "link down")
    assert am.clear("wifi") is True
    assert am.get("wifi")["state"] == "resolved" and am.get("wifi")["last_ts"] == 1795000003000
    assert am.clear("wifi") is False and am.clear("never") is False
    assert am.fire("wifi", "warning", "link down again") == 1
    a = am.get("wifi")
    assert a["state"] == "firing" and a["first_ts"] == 1795000004000 and a["count"] == 1


def test_bad_input_is_normalised_not_raised():
    cap = _logcap()
    am = alarms.AlarmManager()
    am.fire("k" * 200, "fatal", "x" * 1000)
    a = am.alarms()[0]
    assert a["severity"] == "error" and len(a["key"]) == am.MAX_KEY and len(a["message"]) <= am.MAX_MESSAGE
    am.fire("obj", "info", ValueError("not a str"))
    assert am.get("obj")["message"] == "not a str"
    assert any(r["msg"] == "unknown alarm severity, using error" for r in cap.records())
    fwtest.raises(ValueError, alarms.AlarmManager, None, 0)


def test_secrets_are_masked_in_messages():
    am = alarms.AlarmManager()
    am.fire("auth", "error", "refresh failed with Authorization: Bearer abc.def.ghi and key=0011")
    assert am.get("auth")["message"] == "refresh failed with Authorization: Bearer *** and key=***"


def test_ring_drops_oldest_non_critical_first_and_counts():
    cap = _logcap()
    am = alarms.AlarmManager(capacity=4, clock=Clock())
    am.fire("c1", "critical", "x")
    am.fire("w1", "warning", "x")
    am.fire("c2", "critical", "x")
    am.fire("w2", "warning", "x")
    am.fire("w3", "info", "x")  # full: w1 (oldest non-critical) goes
    assert sorted(a["key"] for a in am.alarms()) == ["c1", "c2", "w2", "w3"]
    assert am.dropped == 1
    am.fire("c3", "critical", "x")  # w2 goes, then w3, never a critical while others exist
    am.fire("c4", "critical", "x")
    assert sorted(a["key"] for a in am.alarms()) == ["c1", "c2", "c3", "c4"] and am.dropped == 3
    am.fire("c5", "critical", "x")  # only criticals left: the oldest one goes
    assert sorted(a["key"] for a in am.alarms()) == ["c2", "c3", "c4", "c5"] and am.dropped == 4
    assert any(r["msg"] == "alarm buffer full, dropped" and r["alarm"] == "w1" for r in cap.records())


def test_delivered_alarms_make_room_before_undelivered_ones_are_dropped():
    am = alarms.AlarmManager(capacity=2)
    am.fire("old-but-delivered", "warning", "x")
    assert fwtest.run(am.flush(FakeHTTP(), URL, "t")) is True
    am.fire("new", "warning", "x")
    am.fire("newer", "warning", "x")
    assert sorted(a["key"] for a in am.alarms()) == ["new", "newer"] and am.dropped == 0


def test_flush_posts_protocol_batches_and_forgets_delivered_resolved():
    am = alarms.AlarmManager(clock=Clock())
    am.BATCH = 2
    am.fire("a", "warning", "ma")
    am.fire("b", "critical", "mb")
    am.fire("c", "info", "mc")
    am.clear("a")
    http = FakeHTTP()
    assert fwtest.run(am.flush(http, URL, "jwt")) is True
    assert len(http.calls) == 2
    method, url, body, headers = http.calls[0]
    assert (method, url, headers) == ("POST", URL, {"Authorization": "Bearer jwt"})
    assert _sent_keys(http.calls[0]) == ["b", "c"]  # criticals first, then oldest change first
    assert _sent_keys(http.calls[1]) == ["a"]
    assert http.calls[1][2]["alarms"][0] == {"key": "a", "severity": "warning", "message": "ma", "count": 1,
                                             "first_ts": 1795000001000, "last_ts": 1795000004000,
                                             "state": "resolved"}
    assert am.get("a") is None and am.get("b")["state"] == "firing"  # firing ones stay for dedup
    assert am.pending() == 0 and am.sent == 3
    assert fwtest.run(am.flush(http, URL, "jwt")) is True and len(http.calls) == 2  # nothing new: no request
    am.fire("b", "critical", "mb")
    fwtest.run(am.flush(http, URL, "jwt"))
    assert http.calls[2][2]["alarms"][0]["count"] == 2


def test_flush_failure_keeps_everything_and_backs_off():
    cap = _logcap()
    am = alarms.AlarmManager()
    am.fire("a", "error", "x")
    am.clear("a")
    am.fire("b", "warning", "y")
    http = FakeHTTP([HTTPError("connect timeout"), 503, 401])
    assert fwtest.run(am.flush(http, URL, "t")) is False
    assert am.pending() == 2 and am.get("a")["state"] == "resolved" and am.failures == 1
    assert am.last_error == "HTTPError: connect timeout"
    assert am.backoff_ms == am.BACKOFF_MIN_MS and am.retry_in_ms() > 0
    assert fwtest.run(am.flush(http, URL, "t")) is False and len(http.calls) == 1  # backing off: no request
    assert fwtest.run(am.flush(http, URL, "t", force=True)) is False and am.last_error == "HTTP 503"
    assert am.backoff_ms == 2 * am.BACKOFF_MIN_MS
    assert fwtest.run(am.flush(http, URL, "t", force=True)) is False and am.last_error == "HTTP 401"
    assert am.pending() == 2
    assert fwtest.run(am.flush(http, URL, "t", force=True)) is True  # the default answer is 200
    assert am.pending() == 0 and am.get("a") is None and am.failures == 0 and am.retry_in_ms() == 0
    assert any(r["msg"] == "alarm delivery failed" for r in cap.records())


def test_backoff_is_capped():
    am = alarms.AlarmManager()
    am.fire("a", "error", "x")
    http = FakeHTTP(default=500)
    for _ in range(20):
        fwtest.run(am.flush(http, URL, "t", force=True))
    assert am.backoff_ms == am.BACKOFF_MAX_MS and am.failures == 20
    assert am.retry_in_ms() <= am.BACKOFF_MAX_MS


def test_alarm_changed_while_in_flight_is_sent_again():
    am = alarms.AlarmManager()
    am.fire("flap", "warning", "x")
    http = FakeHTTP()
    http.during = lambda: am.fire("flap", "warning", "x") if len(http.calls) == 1 else None
    assert fwtest.run(am.flush(http, URL, "t")) is True
    assert len(http.calls) == 2
    assert http.calls[0][2]["alarms"][0]["count"] == 1 and http.calls[1][2]["alarms"][0]["count"] == 2


def test_clear_while_in_flight_is_not_lost():
    am = alarms.AlarmManager()
    am.fire("k", "error", "x")
    http = FakeHTTP()
    http.during = lambda: am.clear("k") if len(http.calls) == 1 else None
    fwtest.run(am.flush(http, URL, "t"))
    assert [c[2]["alarms"][0]["state"] for c in http.calls] == ["firing", "resolved"]
    assert am.get("k") is None


def test_critical_alarms_survive_a_reset():
    d = fwtest.tmpdir()
    am = alarms.AlarmManager(d + "/flash", clock=Clock())
    am.fire("ota.rollback", "critical", "trial boot failed")
    am.fire("sensor", "warning", "flaky")
    assert os.listdir(d + "/flash") == ["alarms.json"]
    rebooted = alarms.AlarmManager(d + "/flash")
    assert [a["key"] for a in rebooted.alarms()] == ["ota.rollback"]
    assert rebooted.get("ota.rollback")["message"] == "trial boot failed" and rebooted.pending() == 1
    http = FakeHTTP()
    fwtest.run(rebooted.flush(http, URL, "t"))
    assert _sent_keys(http.calls[0]) == ["ota.rollback"]
    # Still firing: still persisted. Resolved and delivered: the file goes.
    assert alarms.AlarmManager(d + "/flash").get("ota.rollback") is not None
    rebooted.clear("ota.rollback")
    assert alarms.AlarmManager(d + "/flash").get("ota.rollback")["state"] == "resolved"
    fwtest.run(rebooted.flush(http, URL, "t"))
    assert os.listdir(d + "/flash") == []
    assert alarms.AlarmManager(d + "/flash").alarms() == []


def test_repeats_of_a_critical_alarm_are_persisted_at_flush_not_each_time():
    d = fwtest.tmpdir()
    am = alarms.AlarmManager(d, clock=Clock())
    am.fire("power", "critical", "brown-out")
    for _ in range(5):
        am.fire("power", "critical", "brown-out")
    assert alarms.AlarmManager(d).get("power")["count"] == 1  # not rewritten on every repeat
    fwtest.run(am.flush(FakeHTTP(default=500), URL, "t"))  # even a failed delivery writes the pending state
    assert alarms.AlarmManager(d).get("power")["count"] == 6


def test_corrupt_or_bad_persisted_file_is_ignored_with_a_log_line():
    d = fwtest.tmpdir()
    for content in ("{half", '{"alarms": 3}', "[]"):
        with open(d + "/alarms.json", "w") as f:
            f.write(content)
        cap = _logcap()
        am = alarms.AlarmManager(d)
        assert am.alarms() == [], content
        assert any(r["msg"] == "critical alarms file corrupt, ignored" for r in cap.records()), content
    good = {"key": "ok", "severity": "critical", "message": "m", "count": 2, "first_ts": 1, "last_ts": 2,
            "state": "firing"}
    with open(d + "/alarms.json", "w") as f:
        f.write(json.dumps({"alarms": [good, {"key": "bad", "severity": "fatal"}, "junk", dict(good, count="2"),
                                       dict(good, key="", state="firing")]}))
    cap = _logcap()
    am = alarms.AlarmManager(d)
    assert [a["key"] for a in am.alarms()] == ["ok"] and am.get("ok")["count"] == 2
    rec = [r for r in cap.records() if r["msg"] == "critical alarms file had bad entries"]
    assert rec[0]["bad"] == 4


def test_full_flash_on_persist_is_counted_and_retried_never_raised():
    d = fwtest.tmpdir()
    os.mkdir(d + "/alarms.json.tmp")  # the temp file cannot be created: like a full flash
    cap = _logcap()
    am = alarms.AlarmManager(d)
    am.fire("disk", "critical", "x")
    assert am.persist_errors == 1 and am.get("disk") is not None
    assert any(r["msg"] == "cannot persist critical alarms" for r in cap.records())
    os.rmdir(d + "/alarms.json.tmp")
    fwtest.run(am.flush(FakeHTTP(default=500), URL, "t"))
    assert fsutil.read_json(d + "/alarms.json")["alarms"][0]["key"] == "disk"


def test_report_exception_has_type_message_and_bounded_masked_traceback():
    am = alarms.AlarmManager()
    log.configure(console=False)

    def deep(n):
        if n == 0:
            raise RuntimeError("sensor loop died, token=s3cr3t")
        deep(n - 1)

    try:
        deep(40)
    except RuntimeError as e:
        count = am.report_exception("task.sampler", e)
    a = am.get("task.sampler")
    assert count == 1 and a["severity"] == "error"
    assert a["message"].startswith("RuntimeError: sensor loop died, token=***\n")
    assert "deep" in a["message"] and "s3cr3t" not in a["message"]
    assert len(a["message"]) <= am.MAX_MESSAGE + 1 + am.MAX_TRACEBACK


def test_flush_against_a_real_server():
    from iotlib.http import HTTPClient
    answers = [503, 200, 200]

    def app(method, path, headers, doc):
        status = answers.pop(0)
        return status, ({"accepted": len(doc["alarms"])} if status == 200 else {"error": "busy"})

    async def main():
        srv = peers.App(app)
        base = await srv.start()
        try:
            url = base + "/api/v1/devices/d1/alarms"
            am = alarms.AlarmManager(clock=Clock())
            am.fire("sensor.sht3x", "warning", "CRC mismatch")
            am.fire("sensor.sht3x", "warning", "CRC mismatch")
            am.fire("relay.pump", "critical", "stuck on")
            http = HTTPClient(timeout_ms=5000)
            first = await am.flush(http, url, "jwt-9")
            second = await am.flush(http, url, "jwt-9", force=True)
            am.clear("sensor.sht3x")
            third = await am.flush(http, url, "jwt-9")
            return srv.log, am, first, second, third
        finally:
            await srv.stop()

    reqs, am, first, second, third = fwtest.run(main())
    assert (first, second, third) == (False, True, True)
    assert len(reqs) == 3
    method, path, headers, doc = reqs[1]
    assert method == "POST" and path == "/api/v1/devices/d1/alarms"
    assert headers["authorization"] == "Bearer jwt-9" and headers["content-type"].startswith("application/json")
    assert [a["key"] for a in doc["alarms"]] == ["relay.pump", "sensor.sht3x"]
    assert doc["alarms"][1]["count"] == 2 and doc["alarms"][1]["state"] == "firing"
    assert reqs[0][3] == doc  # the failed batch was resent unchanged
    assert reqs[2][3]["alarms"][0]["state"] == "resolved"
    assert am.get("sensor.sht3x") is None and am.get("relay.pump") is not None


def test_run_delivers_once_registered():
    am = alarms.AlarmManager()
    am.fire("a", "warning", "x")
    http = FakeHTTP()
    registered = []

    async def main():
        task = asyncio.create_task(am.run(http, lambda: registered[0] if registered else None, interval_ms=10))
        await sleep_ms(50)
        before = len(http.calls)
        registered.append((URL, "t"))
        for _ in range(100):
            await sleep_ms(10)
            if am.pending() == 0:
                break
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return before

    assert fwtest.run(main()) == 0
    assert am.pending() == 0 and len(http.calls) == 1
