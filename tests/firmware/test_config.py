import os
import json
import fwtest
import peers
from iotlib import config, log, fsutil
from iotlib.compat import asyncio

SCHEMA = {
    "sampling": {
        "interval_ms": {"type": "int", "min": 10, "max": 3600000, "required": True},
        "fields": {"type": "list", "items": {"type": "str", "enum": ["temp", "hum", "press"]}, "min": 1},
        "filter": {"type": "str", "enum": ["none", "median", "ema"]},
        "alpha": {"type": "float", "min": 0, "max": 1},
    },
    "wifi": {
        "ssid": {"type": "str", "min": 1, "max": 32, "required": True},
        "password": {"type": "str", "max": 63},
        "power_save": {"type": "bool"},
    },
    "relays": {"*": {"pin": {"type": "int", "min": 0, "max": 28, "required": True},
                     "mode": {"type": "str", "enum": ["off", "on", "restore"]}}},
    "time": {"servers": {"type": "list", "items": {"type": "str"}, "max": 4}, "offset": {"type": "int",
                                                                                          "nullable": True}},
    "log": {"level": {"type": "str", "enum": ["debug", "info", "warning", "error"]}},
}

DEFAULTS = {
    "sampling": {"interval_ms": 1000, "fields": ["temp"], "filter": "none", "alpha": 0.5},
    "wifi": {"ssid": "lab", "password": "", "power_save": False},
    "relays": {},
    "time": {"servers": ["pool.ntp.org"], "offset": None},
    "log": {"level": "info"},
}


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


def _manager(path=None):
    return config.ConfigManager(SCHEMA, DEFAULTS, path)


# -- validation ---------------------------------------------------------------------------------------------------

def test_valid_defaults_have_no_errors():
    assert config.validate(SCHEMA, DEFAULTS) == []


def test_errors_name_the_path():
    cfg = config.merge(DEFAULTS, {"sampling": {"interval_ms": 5, "fields": ["temp", "wind"], "filter": "avg",
                                               "alpha": 1.5}})
    errs = config.validate(SCHEMA, cfg)
    assert "sampling.interval_ms: must be >= 10" in errs
    assert "sampling.fields[1]: must be one of temp, hum, press" in errs
    assert "sampling.filter: must be one of none, median, ema" in errs
    assert "sampling.alpha: must be <= 1" in errs


def test_type_errors_bool_is_not_a_number_and_nulls():
    cfg = config.merge(DEFAULTS, {"sampling": {"interval_ms": True, "alpha": "0.3"}, "wifi": {"ssid": None,
                                                                                            "power_save": 1}})
    errs = config.validate(SCHEMA, cfg)
    assert "sampling.interval_ms: expected int, got bool" in errs
    assert "sampling.alpha: expected float, got str" in errs
    assert "wifi.ssid: must not be null" in errs
    assert "wifi.power_save: expected bool, got int" in errs
    ok = config.merge(DEFAULTS, {"sampling": {"alpha": 1}, "time": {"offset": None}})
    assert config.validate(SCHEMA, ok) == []  # an int is a valid float; nullable accepts null


def test_required_lengths_unknown_keys_and_sections():
    cfg = config.copy(DEFAULTS)
    del cfg["wifi"]["ssid"]
    cfg["sampling"]["intreval_ms"] = 10
    cfg["sampling"]["fields"] = []
    cfg["time"]["servers"] = ["a", "b", "c", "d", "e"]
    cfg["log"] = "debug"
    errs = config.validate(SCHEMA, cfg)
    assert "wifi.ssid: required" in errs
    assert "sampling.intreval_ms: unknown key" in errs
    assert "sampling.fields: length must be >= 1" in errs
    assert "time.servers: length must be <= 4" in errs
    assert "log: expected section, got str" in errs


def test_map_sections_validate_each_entry():
    cfg = config.merge(DEFAULTS, {"relays": {"pump": {"pin": 2, "mode": "restore"}, "fan": {"pin": 40},
                                             "door": {"mode": "on"}}})
    errs = config.validate(SCHEMA, cfg)
    assert sorted(errs) == ["relays.door.pin: required", "relays.fan.pin: must be <= 28"]  # dict order varies


def test_error_list_is_bounded():
    cfg = config.merge(DEFAULTS, {"sampling": {"fields": ["x"] * 50}})
    assert len(config.validate(SCHEMA, cfg)) == config.MAX_ERRORS


def test_broken_schema_and_defaults_raise_config_error():
    fwtest.raises(config.ConfigError, config.validate, {"a": {"type": "integer"}}, {"a": 1})
    e = fwtest.raises(config.ConfigError, config.ConfigManager, SCHEMA, config.merge(DEFAULTS, {"wifi": {"ssid": ""}}))
    assert "wifi.ssid: length must be >= 1" in str(e)
    assert isinstance(e, ValueError)


# -- apply, callbacks, rollback ----------------------------------------------------------------------------------

def test_apply_merges_over_defaults_and_calls_only_changed_sections():
    cm = _manager()
    calls = []
    cm.on_change("sampling", lambda v: calls.append(("sampling", v["interval_ms"])))
    cm.on_change("wifi", lambda v: calls.append(("wifi", v["ssid"])))
    ok, reason = cm.apply({"sampling": {"interval_ms": 250}}, 3)
    assert (ok, reason) == (True, "applied")
    assert calls == [("sampling", 250)]
    assert cm.version == 3 and cm.config["sampling"]["interval_ms"] == 250
    assert cm.config["sampling"]["fields"] == ["temp"]  # filled from the defaults
    assert cm.config["wifi"] == DEFAULTS["wifi"]
    ok, reason = cm.apply({"sampling": {"interval_ms": 250}}, 4)
    assert (ok, reason) == (True, "unchanged") and cm.version == 4 and len(calls) == 1
    # Defaults are not shared with the live config.
    cm.config["sampling"]["fields"].append("hum")
    assert DEFAULTS["sampling"]["fields"] == ["temp"] and cm.defaults["sampling"]["fields"] == ["temp"]


def test_invalid_config_is_rejected_and_nothing_changes():
    cap = _logcap()
    cm = _manager()
    calls = []
    cm.on_change("sampling", calls.append)
    ok, reason = cm.apply({"sampling": {"interval_ms": 1}}, 2)
    assert not ok and reason == "sampling.interval_ms: must be >= 10"
    assert calls == [] and cm.version == 0 and cm.config == DEFAULTS
    ok, reason = cm.apply(["not", "a", "dict"], 3)
    assert not ok and "config: expected section, got list" in reason
    rec = [r for r in cap.records() if r["module"] == "config"][0]
    assert rec["msg"] == "config rejected" and rec["reason"] == "sampling.interval_ms: must be >= 10"
    assert cm.failures == 2


def test_callback_failure_rolls_back_every_section():
    cap = _logcap()
    cm = _manager()
    seen = []

    def relays_cb(v):
        seen.append(("relays", v))

    def sampling_cb(v):
        seen.append(("sampling", v["interval_ms"]))
        if v["interval_ms"] == 50:
            raise ValueError("sensor cannot sample that fast")

    cm.on_change("relays", relays_cb)
    cm.on_change("sampling", sampling_cb)
    assert cm.apply({"sampling": {"interval_ms": 500}}, 1)[0]
    seen[:] = []
    ok, reason = cm.apply({"relays": {"pump": {"pin": 3}}, "sampling": {"interval_ms": 50}}, 2)
    assert not ok
    assert reason == "sampling: hot-reload failed: ValueError: sensor cannot sample that fast"
    # relays switched, then sampling failed: both are called back with their old values.
    assert seen == [("relays", {"pump": {"pin": 3}}), ("sampling", 50), ("relays", {}), ("sampling", 500)]
    assert cm.version == 1 and cm.config["sampling"]["interval_ms"] == 500 and cm.config["relays"] == {}
    assert any(r["msg"] == "config rolled back" for r in cap.records())


def test_failing_rollback_callback_is_logged_and_others_restored():
    cap = _logcap()
    cm = _manager()
    restored = []

    def bad(v):
        raise RuntimeError("stuck")

    cm.on_change("log", lambda v: restored.append(v["level"]))
    cm.on_change("wifi", bad)
    ok, reason = cm.apply({"log": {"level": "debug"}, "wifi": {"ssid": "other"}}, 5)
    assert not ok and "wifi: hot-reload failed: RuntimeError: stuck" == reason
    assert restored == ["debug", "info"]
    assert cm.config == DEFAULTS and cm.version == 0
    assert any(r["msg"] == "rollback callback failed" and r["section"] == "wifi" for r in cap.records())


def test_secrets_in_config_never_reach_the_log():
    cap = _logcap()
    cm = _manager()
    cm.apply({"wifi": {"ssid": "x", "password": "p" * 70}}, 2)  # too long: rejected, reason logged
    cm.apply({"wifi": {"ssid": "x", "password": "hunter2hunter2"}}, 3)
    text = "".join(cap.text)
    assert "hunter2" not in text and "ppppp" not in text


# -- persistence ---------------------------------------------------------------------------------------------------

def test_last_known_good_persists_and_loads_at_boot():
    d = fwtest.tmpdir()
    p = d + "/config.json"
    cm = _manager(p)
    assert cm.apply({"sampling": {"interval_ms": 20}}, 7)[0]
    assert not cm.apply({"sampling": {"interval_ms": 2}}, 8)[0]  # rejected: not persisted
    assert sorted(os.listdir(d)) == ["config.json"]
    booted = _manager(p)
    assert booted.load() is True
    assert booted.version == 7 and booted.config["sampling"]["interval_ms"] == 20
    assert booted.etag == '"7"'


def test_missing_file_keeps_defaults_quietly():
    d = fwtest.tmpdir()
    cm = _manager(d + "/none.json")
    assert cm.load() is False and cm.config == DEFAULTS and cm.version == 0
    assert _manager().load() is False


def test_corrupt_or_invalid_file_gives_defaults_and_a_log_line():
    d = fwtest.tmpdir()
    p = d + "/config.json"
    for content in ("{truncated", '["list"]', '{"version": "7", "config": {}}',
                    json.dumps({"version": 9, "config": {"sampling": {"interval_ms": 0}}})):
        with open(p, "w") as f:
            f.write(content)
        cap = _logcap()
        cm = _manager(p)
        assert cm.load() is False, content
        assert cm.config == DEFAULTS and cm.version == 0
        rec = [r for r in cap.records() if r["msg"] == "stored config unusable, using defaults"]
        assert len(rec) == 1 and rec[0]["level"] == "error", content
    assert "sampling.interval_ms: must be >= 10" in rec[0]["reason"]


def test_failed_persist_keeps_old_file_and_still_applies():
    d = fwtest.tmpdir()
    p = d + "/config.json"
    cm = _manager(p)
    assert cm.apply({"sampling": {"interval_ms": 30}}, 1)[0]
    os.mkdir(p + ".tmp")  # the temp file cannot be created: the write fails like a full flash would
    cap = _logcap()
    assert cm.apply({"sampling": {"interval_ms": 40}}, 2) == (True, "applied")
    assert cm.config["sampling"]["interval_ms"] == 40
    assert any(r["msg"] == "cannot persist config" for r in cap.records())
    assert fsutil.read_json(p) == {"version": 1, "config": config.merge(DEFAULTS, {"sampling": {"interval_ms": 30}})}
    os.rmdir(p + ".tmp")


# -- fetch against canned responses --------------------------------------------------------------------------------

class FakeResponse:
    def __init__(self, status, doc=None, headers=None):
        self.status = status
        self.headers = headers or {}
        self._doc = doc

    def json(self):
        if isinstance(self._doc, Exception):
            raise self._doc
        return self._doc


class FakeHTTP:
    """Canned answers for HTTPClient.request (unit tests only; a real server is used below)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    async def request(self, method, url, json=None, headers=None, body=None):
        self.calls.append((method, url, json, headers))
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


URL = "http://cp/api/v1/devices/d1/config"


def test_fetch_applies_reports_and_sends_if_none_match():
    cm = _manager()
    http = FakeHTTP([FakeResponse(200, {"version": 4, "config": {"sampling": {"interval_ms": 100}}}, {"etag": '"4"'}),
                     FakeResponse(200, {"ok": True}),
                     FakeResponse(304)])
    assert fwtest.run(cm.fetch(http, URL, "tok")) == (True, "applied")
    assert cm.version == 4 and cm.config["sampling"]["interval_ms"] == 100
    m, u, body, h = http.calls[0]
    assert (m, u) == ("GET", URL) and h["Authorization"] == "Bearer tok" and "If-None-Match" not in h
    m, u, body, h = http.calls[1]
    assert (m, u, body) == ("POST", URL + "/report", {"version": 4, "status": "applied"})
    assert fwtest.run(cm.fetch(http, URL, "tok")) == (False, "not modified")
    assert http.calls[2][3]["If-None-Match"] == '"4"'


def test_fetch_rejects_invalid_reports_reason_and_does_not_retry_same_version():
    cm = _manager()
    bad = {"version": 5, "config": {"sampling": {"interval_ms": 1}}}
    http = FakeHTTP([FakeResponse(200, bad, {"etag": '"5"'}), FakeResponse(200, {"ok": True}),
                     FakeResponse(200, bad, {"etag": '"5"'})])
    ok, reason = fwtest.run(cm.fetch(http, URL, "tok"))
    assert not ok and reason == "sampling.interval_ms: must be >= 10"
    assert http.calls[1][2] == {"version": 5, "status": "rejected", "reason": reason}
    assert cm.version == 0 and cm.config == DEFAULTS
    ok, reason = fwtest.run(cm.fetch(http, URL, "tok", wait=30))
    assert not ok and reason.startswith("already rejected")
    m, u, _, h = http.calls[2]
    assert u == URL + "?version=5&wait=30" and h["If-None-Match"] == '"5"'
    assert len(http.calls) == 3  # no second report for the same rejected version


def test_report_reason_is_bounded():
    cm = _manager()
    relays = {"relay_with_a_really_rather_long_name_%02d" % i: {"pin": 99} for i in range(20)}
    bad = {"version": 6, "config": {"relays": relays}}
    http = FakeHTTP([FakeResponse(200, bad), FakeResponse(200, {"ok": True})])
    ok, reason = fwtest.run(cm.fetch(http, URL, "tok"))
    assert not ok and len(reason) > config.MAX_REASON
    sent = http.calls[1][2]["reason"]
    assert len(sent) == config.MAX_REASON and reason.startswith(sent)


def test_fetch_report_failure_is_retried_on_next_fetch():
    from iotlib.http import HTTPError
    cm = _manager()
    http = FakeHTTP([FakeResponse(200, {"version": 2, "config": {"log": {"level": "debug"}}}),
                     HTTPError("connection reset"),
                     FakeResponse(200, {"ok": True}),
                     FakeResponse(304)])
    assert fwtest.run(cm.fetch(http, URL, "tok")) == (True, "applied")
    assert fwtest.run(cm.fetch(http, URL, "tok")) == (False, "not modified")
    assert http.calls[2][:3] == ("POST", URL + "/report", {"version": 2, "status": "applied"})
    assert http.calls[3][0] == "GET"


def test_fetch_malformed_and_error_responses_change_nothing():
    from iotlib.http import HTTPError
    cm = _manager()
    http = FakeHTTP([FakeResponse(200, HTTPError("response body is not JSON")),
                     FakeResponse(200, {"version": "7", "config": {}}),
                     FakeResponse(200, ["x"]),
                     FakeResponse(500, {"error": "db down"}),
                     FakeResponse(401, {"error": "expired"}),
                     HTTPError("timeout")])
    assert fwtest.run(cm.fetch(http, URL, "t")) == (False, "malformed response")
    assert fwtest.run(cm.fetch(http, URL, "t")) == (False, "malformed response")
    assert fwtest.run(cm.fetch(http, URL, "t")) == (False, "malformed response")
    assert fwtest.run(cm.fetch(http, URL, "t")) == (False, "HTTP 500")
    assert fwtest.run(cm.fetch(http, URL, "t")) == (False, "HTTP 401")
    fwtest.raises(HTTPError, fwtest.run, cm.fetch(http, URL, "t"))
    assert cm.config == DEFAULTS and cm.version == 0


# -- fetch against a real HTTP server on 127.0.0.1 -----------------------------------------------------------------

def test_fetch_against_real_server_with_http_client():
    from iotlib.http import HTTPClient
    state = {"version": 3, "config": {"sampling": {"interval_ms": 60}}, "reports": [], "gets": []}

    async def handler(reader, writer):
        try:
            method, path, headers, body = await peers.read_request(reader)
            if method == "GET":
                state["gets"].append((path, headers.get("if-none-match"), headers.get("authorization")))
                etag = '"%d"' % state["version"]
                if headers.get("if-none-match") == etag:
                    writer.write(peers.response(304, None, "ETag: %s\r\n" % etag))
                else:
                    writer.write(peers.response(200, {"version": state["version"], "config": state["config"]},
                                                "ETag: %s\r\n" % etag))
            else:
                state["reports"].append((path, json.loads(body)))
                writer.write(peers.response(200, {"ok": True}))
            await writer.drain()
        finally:
            await peers.close(writer)

    async def main():
        srv, port = await peers.serve(handler)
        try:
            url = "http://127.0.0.1:%d/api/v1/devices/d1/config" % port
            cm = _manager()
            http = HTTPClient(timeout_ms=5000)
            r1 = await cm.fetch(http, url, "jwt-1")
            r2 = await cm.fetch(http, url, "jwt-1")
            state["version"] = 4
            state["config"] = {"sampling": {"interval_ms": 3}}
            r3 = await cm.fetch(http, url, "jwt-1")
            return cm, r1, r2, r3
        finally:
            await peers.stop(srv)

    cm, r1, r2, r3 = fwtest.run(main())
    assert r1 == (True, "applied") and r2 == (False, "not modified")
    assert r3 == (False, "sampling.interval_ms: must be >= 10")
    assert cm.version == 3 and cm.config["sampling"]["interval_ms"] == 60
    assert state["gets"][0] == ("/api/v1/devices/d1/config", None, "Bearer jwt-1")
    assert state["gets"][1][1] == '"3"'
    assert state["reports"] == [
        ("/api/v1/devices/d1/config/report", {"version": 3, "status": "applied"}),
        ("/api/v1/devices/d1/config/report",
         {"version": 4, "status": "rejected", "reason": "sampling.interval_ms: must be >= 10"})]
