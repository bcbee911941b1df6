import os
import json
import fwtest
from iotlib import log

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJyZWxheS0xIiwicm9sZSI6ImRldmljZSJ9.c2lnbmF0dXJlX2J5dGVz"


class Capture:
    def __init__(self):
        self.lines = []
        self._part = []

    def write(self, s):
        if s == "\n":
            self.lines.append("".join(self._part))
            self._part = []
        else:
            self._part.append(s)

    def records(self):
        return [json.loads(line) for line in self.lines]


class BrokenConsole:
    def write(self, s):
        raise OSError(5)


def _capture(level="debug"):
    cap = Capture()
    log.configure(level=level, console=cap)
    return cap


def _read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_record_is_one_json_object_with_envelope_and_fields():
    cap = _capture()
    log.get("net").info("connected", ssid="lab", rssi=-61, ok=True, nested={"a": [1, 2]})
    r = cap.records()[0]
    assert r["level"] == "info" and r["module"] == "net" and r["msg"] == "connected"
    assert r["ssid"] == "lab" and r["rssi"] == -61 and r["ok"] is True and r["nested"] == {"a": [1, 2]}
    assert isinstance(r["ts"], int) and r["ts"] > 1600000000000
    assert len(cap.lines) == 1


def test_levels_filter_globally_and_per_logger():
    cap = _capture("warning")
    lg = log.get("lvl")
    lg.debug("d")
    lg.info("i")
    lg.warning("w")
    lg.error("e")
    lg.critical("c")
    assert [r["level"] for r in cap.records()] == ["warning", "error", "critical"]
    lg.set_level("debug")
    lg.debug("now visible")
    assert cap.records()[-1]["msg"] == "now visible"
    lg.set_level(None)
    lg.debug("hidden again")
    assert cap.records()[-1]["msg"] == "now visible"
    fwtest.raises(ValueError, log.configure, level="loud")


def test_field_cannot_overwrite_envelope():
    cap = _capture()
    log.get("m").info("real", level="fake", ts="fake", module="fake")
    r = cap.records()[0]
    assert r["level"] == "info" and r["msg"] == "real" and r["module"] == "m" and isinstance(r["ts"], int)
    assert r["_level"] == "fake" and r["_ts"] == "fake" and r["_module"] == "fake"


def test_secret_fields_are_masked_by_key_name_also_nested():
    cap = _capture()
    log.get("auth").info("registering", device_key="0123abcd", password="hunter2", api_token="t0k",
                         Authorization="Basic dXNlcjpwYXNz",
                         wifi={"ssid": "lab", "psk": "wpa-secret", "list": [{"client_secret": "s"}]},
                         keys=3, device_id="relay-1")
    line = cap.lines[0]
    for secret in ("0123abcd", "hunter2", "t0k", "dXNlcjpwYXNz", "wpa-secret", '"s"'):
        assert secret not in line, secret
    r = cap.records()[0]
    assert r["device_key"] == "***" and r["password"] == "***" and r["wifi"]["psk"] == "***"
    assert r["wifi"]["ssid"] == "lab" and r["wifi"]["list"][0]["client_secret"] == "***"
    assert r["keys"] == 3 and r["device_id"] == "relay-1"


def test_secret_values_are_masked_by_pattern_in_message_and_fields():
    cap = _capture()
    log.get("http").warning("GET /ws?token=abc123&x=1 with Authorization: Bearer s3cr3t-t0ken failed",
                            header="bearer " + JWT, raw=JWT + " trailing", body='{"password": "pw1", "n": 1}',
                            items=["ok", "Bearer zzz"])
    line = cap.lines[0]
    for secret in ("abc123", "s3cr3t-t0ken", JWT[:40], JWT[-20:], "pw1", "zzz"):
        assert secret not in line, secret
    r = cap.records()[0]
    assert r["msg"] == "GET /ws?token=***&x=1 with Authorization: Bearer *** failed"
    assert r["raw"] == "*** trailing" and r["items"] == ["ok", "Bearer ***"]


def test_mask_leaves_ordinary_text_alone():
    for s in ("host api.example.com", "version 1.2.3", "at 10:20:30", "a=b c=d", "keyboard: us", "monkey=banana"):
        assert log.mask(s) == s, s
    assert log.mask_text("no secret here") == "no secret here"


def test_mask_makes_values_json_safe_and_bounded():
    m = log.mask({"b": b"\x00key material", "f": float("inf"), "t": (1, 2), "o": object(), "s": "x" * 2000})
    assert m["b"] == "<13 bytes>" and m["f"] == "inf" and m["t"] == [1, 2] and isinstance(m["o"], str)
    assert len(m["s"]) == log.MAX_STR and m["s"].endswith("...")
    assert log.mask({1: "a", "k": {2: "Bearer x"}}) == {"1": "a", "k": {"2": "Bearer ***"}}
    deep = {}
    cur = deep
    for _ in range(20):
        cur["d"] = {}
        cur = cur["d"]
    json.dumps(log.mask(deep))  # bounded depth, still serialisable


def test_exc_logs_type_message_and_masked_traceback():
    cap = _capture()

    def inner():
        raise ValueError("bad reply token=leaky")

    try:
        inner()
    except ValueError as e:
        log.get("task").exc("task crashed", e, task="sampler")
    r = cap.records()[0]
    assert r["level"] == "error" and r["task"] == "sampler"
    assert r["error"] == "ValueError: bad reply token=***"
    assert "inner" in r["traceback"] and "leaky" not in cap.lines[0]
    assert len(r["traceback"]) <= log.MAX_TRACEBACK


def test_unserialisable_field_does_not_raise():
    class Weird:
        def __str__(self):
            raise RuntimeError("no str")

    cap = _capture()
    log.get("w").info("odd", thing=Weird())
    assert cap.records()[0]["msg"] == "unloggable record"


def test_file_sink_rotates_and_keeps_n_backups():
    d = fwtest.tmpdir()
    p = d + "/logs/app.log"
    log.configure(level="info", console=False, path=p, max_bytes=400, backups=2)
    lg = log.get("rot")
    for i in range(40):
        lg.info("line", i=i)
    names = sorted(os.listdir(d + "/logs"))
    assert names == ["app.log", "app.log.1", "app.log.2"], names
    for n in names:
        assert os.stat(d + "/logs/" + n)[6] <= 400
    newest = _read_lines(p)
    assert newest[-1]["i"] == 39
    # Backups hold older, contiguous lines: .2 < .1 < live.
    b1 = _read_lines(p + ".1")
    b2 = _read_lines(p + ".2")
    assert b2[-1]["i"] + 1 == b1[0]["i"] and b1[-1]["i"] + 1 == newest[0]["i"]


def test_retention_removes_backups_beyond_a_smaller_setting():
    d = fwtest.tmpdir()
    p = d + "/app.log"
    log.configure(level="info", console=False, path=p, max_bytes=200, backups=4)
    for i in range(40):
        log.get("ret").info("x", i=i)
    assert len(os.listdir(d)) == 5
    log.configure(level="info", console=False, path=p, max_bytes=200, backups=1)
    assert sorted(os.listdir(d)) == ["app.log", "app.log.1"]


def test_zero_backups_truncates_in_place():
    d = fwtest.tmpdir()
    p = d + "/app.log"
    log.configure(level="info", console=False, path=p, max_bytes=150, backups=0)
    for i in range(20):
        log.get("z").info("x", i=i)
    assert os.listdir(d) == ["app.log"]
    assert _read_lines(p)[-1]["i"] == 19


def test_full_flash_drops_and_counts_never_raises():
    before = log.dropped
    log.configure(level="info", console=False, path="/dev/full")
    lg = log.get("full")
    for i in range(5):
        lg.error("cannot persist", i=i)
    assert log.dropped == before + 5
    assert log.stats()["dropped"] == log.dropped


def test_failing_sink_recovers_when_flash_is_back():
    d = fwtest.tmpdir()
    p = d + "/gone/app.log"
    log.configure(level="info", console=False, path=p)
    fwtest.rmtree(d + "/gone")  # the directory vanishes: every write fails
    before = log.dropped
    log.get("rec").info("lost")
    assert log.dropped == before + 1
    os.mkdir(d + "/gone")
    log.get("rec").info("kept")
    assert [r["msg"] for r in _read_lines(p)] == ["kept"]
    assert log.dropped == before + 1


def test_broken_console_counts_dropped_and_file_still_written():
    d = fwtest.tmpdir()
    p = d + "/app.log"
    log.configure(level="info", console=BrokenConsole(), path=p)
    before = log.dropped
    log.get("c").info("still on flash")
    assert log.dropped == before + 1
    assert _read_lines(p)[0]["msg"] == "still on flash"


def test_no_sinks_is_silent():
    log.configure(console=False)
    log.get("quiet").critical("nowhere")
    assert log.get("quiet") is log.get("quiet")


def test_mask_never_mutates_the_callers_data_and_copies_only_when_needed():
    src = {"cfg": {"password": "pw", "list": ["Bearer abc", "ok"]}, "n": 1}
    m = log.mask(src)
    assert src == {"cfg": {"password": "pw", "list": ["Bearer abc", "ok"]}, "n": 1}
    assert m == {"cfg": {"password": "***", "list": ["Bearer ***", "ok"]}, "n": 1}
    clean = {"a": [1, "two", {"b": None}], "c": 1.5}
    assert log.mask(clean) is clean


def test_exc_keeps_the_final_line_of_a_long_traceback():
    # Regression: mask() cut every string to its first MAX_STR characters, so the last traceback line (the one that
    # names the exception) was lost for any traceback longer than MAX_STR.
    cap = _capture()

    def deep(n):
        if n == 0:
            raise ValueError("the final line")
        deep(n - 1)

    try:
        deep(12)
    except ValueError as e:
        log.get("task").exc("task crashed", e)
    tb = cap.records()[0]["traceback"]
    assert "ValueError: the final line" in tb, tb
    assert len(tb) <= log.MAX_TRACEBACK
