# A MemoryError anywhere the device works (a request's handler, a WebSocket frame, a config apply, an alarm flush)
# leaves it serving with its state intact, is counted in /metrics (iotlib_memory_errors_total{where}) and rides on the
# next heartbeat (mem_errors). The heap running out is injected where it would happen: the allocation itself is not
# something a test can aim at on both runtimes.
import fwtest
import webclient as wc
from iotlib import metrics
from iotlib.device import Device


def _borrow(module, *names):
    # the fakes of the module's own tests, loaded only for the test that needs them and let go after (a 192K heap
    # does not hold every test module at once). From this directory: under pytest a module of the same name from
    # another test directory (tests/controlplane/test_config.py) may already be loaded under that name.
    import sys
    other = sys.modules.pop(module, None)
    sys.path.insert(0, __file__.rsplit("/", 1)[0] if "/" in __file__ else "")
    try:
        m = __import__(module)
    finally:
        sys.path.pop(0)
    out = [getattr(m, n) for n in names]
    sys.modules.pop(module, None)
    if other is not None:
        sys.modules[module] = other
    return out


def _count(where):
    return metrics.MEM_ERRORS.get(where, 0)


def _metric(where):
    line = '\niotlib_memory_errors_total{where="%s"} ' % where
    text = metrics.REGISTRY.render()
    i = text.find(line)
    return int(text[i + len(line):].split("\n", 1)[0]) if i >= 0 else 0


def test_a_handler_out_of_memory_answers_503_counted_and_the_next_request_is_served():
    serve, = _borrow("test_web", "serve")
    calls = {"n": 0}

    async def hungry(req):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("memory allocation failed")
        return {"ok": True}

    async def t(web, port, state):
        before = _metric("request")
        web.route("/hungry", None, hungry)
        s, h, b = await wc.request(port, "GET", "/hungry")
        assert s == 503 and b == {"error": "out of memory"} and h["retry-after"] == "1", (s, b)
        assert _metric("request") == before + 1
        s, h, b = await wc.request(port, "GET", "/hungry")
        assert s == 200 and b == {"ok": True}
    serve(t)


def test_a_config_apply_out_of_memory_keeps_the_old_config_is_not_rejected_and_is_retried():
    ConfigHTTP, FakeResponse, CONFIG_URL, _manager = _borrow("test_config", "FakeHTTP", "FakeResponse", "URL",
                                                            "_manager")
    cm = _manager()
    old = cm.config["sampling"]["interval_ms"]
    fail = [True]

    def on_sampling(sec):
        if fail[0]:
            fail[0] = False
            raise MemoryError("memory allocation failed")
    cm.on_change("sampling", on_sampling)
    doc = {"version": 4, "config": {"sampling": {"interval_ms": 100}}}
    before, seen = _count("config"), _metric("config")
    http = ConfigHTTP([FakeResponse(200, doc, {"etag": '"4"'}), FakeResponse(200, doc, {"etag": '"4"'}),
                       FakeResponse(200, {"ok": True})])
    assert fwtest.run(cm.fetch(http, CONFIG_URL, "tok")) == (False, "out of memory")
    assert cm.version == 0 and cm.config["sampling"]["interval_ms"] == old and cm.rejected is None
    assert _count("config") == before + 1 and _metric("config") == seen + 1
    assert len(http.calls) == 1, "nothing reported: the version was neither applied nor rejected"
    # the next fetch asks for it again (no etag of it kept) and applies it
    assert "If-None-Match" not in http.calls[0][3]
    assert fwtest.run(cm.fetch(http, CONFIG_URL, "tok")) == (True, "applied")
    assert cm.version == 4 and cm.config["sampling"]["interval_ms"] == 100
    assert http.calls[-1][2] == {"version": 4, "status": "applied"}


def test_an_alarm_flush_out_of_memory_keeps_every_alarm_and_is_counted():
    from iotlib import alarms
    AlarmHTTP, ALARM_URL = _borrow("test_alarms", "FakeHTTP", "URL")
    am = alarms.AlarmManager()
    am.fire("a", "error", "x")
    before = _metric("alarms")
    http = AlarmHTTP([MemoryError("memory allocation failed")])
    assert fwtest.run(am.flush(http, ALARM_URL, "t")) is False
    assert am.pending() == 1 and am.last_error == "MemoryError: memory allocation failed"
    assert _metric("alarms") == before + 1
    assert fwtest.run(am.flush(http, ALARM_URL, "t", force=True)) is True and am.pending() == 0


def test_a_websocket_frame_out_of_memory_skips_that_frame_and_is_counted():
    from iotlib import wsstream
    make_web, = _borrow("test_web", "make_web")
    web, state = make_web()
    st = wsstream.WSStream(web)
    c = wsstream._Client(None, None, None)
    st.clients.append(c)
    real = wsstream._frame
    calls = {"n": 0}

    def frame(op, payload):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("memory allocation failed")
        return real(op, payload)
    before = _metric("ws")
    wsstream._frame = frame
    try:
        st.publish({"seq": 1, "ts": 0, "values": {"t": 1.5}})  # raised out of publish (the sampler's task) before
        assert c.queue == [] and not c.dropped and _metric("ws") == before + 1
        st.publish({"seq": 2, "ts": 0, "values": {"t": 1.5}})
        assert len(c.queue) == 1 and b'"seq": 2' in c.queue[0]
    finally:
        wsstream._frame = real
    fwtest.run(web.stop())


def test_the_heartbeat_reports_the_memory_errors_survived_since_boot():
    _Dev, = _borrow("test_device_heartbeat", "_Dev")
    metrics.memory_error("ws")
    d = _Dev()
    sent = Device._heartbeat_body(d)["mem_errors"]
    assert sent["ws"] == _count("ws") >= 1, sent
