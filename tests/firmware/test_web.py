import json

import fwtest
import webclient as wc
from iotlib.compat import asyncio, epoch_ms
from iotlib.auth import AuthManager, jwt_encode, hash_token
from iotlib.metrics import Metrics
from iotlib.web import DeviceWeb, json_body, error, HANDLED

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
DEV = "dev-1"


def token(role, key=KEY, aud=DEV, exp_in=600):
    return jwt_encode({"sub": "tester", "role": role, "aud": aud, "exp": epoch_ms() // 1000 + exp_in}, key)


def make_web(rate=1000, burst=1000, **kw):
    am = AuthManager(DEV, KEY)
    am.static_tokens = {hash_token("static-admin-token"): "admin"}
    web = DeviceWeb(am.verify, metrics=Metrics(), **kw)
    web.configure({"rate_per_s": rate, "burst": burst})
    state = {"n": 0}

    async def get_thing(req):
        return {"n": state["n"]}

    async def post_thing(req):
        body = json_body(req)
        if not isinstance(body.get("n"), int):
            return error(400, "n must be an integer")
        state["n"] = body["n"]
        return {"n": state["n"]}

    async def crash(req):
        raise RuntimeError("boom")

    web.route("/thing", "viewer", get_thing)
    web.route("/thing", "operator", post_thing, methods=["POST"])
    web.route("/crash", "viewer", crash)
    return web, state


def serve(fn, **kw):
    async def go():
        web, state = make_web(**kw)
        port = await wc.start(web)
        try:
            await fn(web, port, state)
        finally:
            await web.stop()
    fwtest.run(go())


def test_roles_and_auth_paths():
    async def t(web, port, state):
        s, h, b = await wc.request(port, "GET", "/thing")
        assert s == 401 and b["error"] == "missing token" and h["www-authenticate"] == "Bearer"
        s, h, b = await wc.request(port, "GET", "/thing", token="garbage.token.here")
        assert s == 401 and b["error"].startswith("invalid token")
        s, h, b = await wc.request(port, "GET", "/thing", token=token("viewer", key="another-key"))
        assert s == 401 and "bad signature" in b["error"]
        s, h, b = await wc.request(port, "GET", "/thing", token=token("viewer", aud="other-device"))
        assert s == 401
        s, h, b = await wc.request(port, "GET", "/thing", token=token("viewer", exp_in=-3600))
        assert s == 401 and "expired" in b["error"]
        s, h, b = await wc.request(port, "GET", "/thing", token=token("viewer"))
        assert s == 200 and b == {"n": 0}
        s, h, b = await wc.request(port, "POST", "/thing", token=token("viewer"), body={"n": 5})
        assert s == 403 and b["error"] == "role operator required" and state["n"] == 0
        s, h, b = await wc.request(port, "POST", "/thing", token=token("operator"), body={"n": 5})
        assert s == 200 and state["n"] == 5
        s, h, b = await wc.request(port, "POST", "/thing", token="static-admin-token", body={"n": 7})
        assert s == 200 and state["n"] == 7
        s, h, b = await wc.request(port, "GET", "/thing?token=" + token("viewer"))
        assert s == 200
        s, h, b = await wc.request(port, "GET", "/thing", token=token("superuser"))
        assert s == 401
    serve(t)


def test_json_errors_for_everything():
    async def t(web, port, state):
        op = token("operator")
        s, h, b = await wc.request(port, "GET", "/nope", token=op)
        assert s == 404 and b == {"error": "not found"} and h[":reason"] == "Not Found"
        s, h, b = await wc.request(port, "DELETE", "/thing", token=op)
        assert s == 405 and b == {"error": "method not allowed"}
        s, h, b = await wc.request(port, "POST", "/thing", token=op, raw_body=b"{not json")
        assert s == 400 and b == {"error": "request body is not valid JSON"}
        s, h, b = await wc.request(port, "POST", "/thing", token=op, raw_body=b"[1, 2]")
        assert s == 400 and b["error"] == "request body must be a JSON object"
        s, h, b = await wc.request(port, "POST", "/thing", token=op, body={"n": "x"})
        assert s == 400 and b["error"] == "n must be an integer"
        s, h, b = await wc.request(port, "POST", "/thing", token=op, raw_body=b"x" * 5000)
        assert s == 413 and "too large" in b["error"]
        s, h, b = await wc.request(port, "GET", "/crash", token=op)
        assert s == 500 and b == {"error": "internal server error"}
        assert state["n"] == 0
        # and the server still serves
        s, h, b = await wc.request(port, "GET", "/thing", token=op)
        assert s == 200
    serve(t)


def test_rate_limit_429_retry_after():
    async def t(web, port, state):
        v = token("viewer")
        codes = []
        for _ in range(5):
            s, h, b = await wc.request(port, "GET", "/thing", token=v)
            codes.append(s)
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        s, h, b = await wc.request(port, "GET", "/thing", token=v)
        assert s == 429 and b == {"error": "rate limit exceeded"} and int(h["retry-after"]) >= 1
        # unauthenticated calls and bad tokens share the address's own bucket: limited too
        codes = []
        for i in range(5):
            s, h, b = await wc.request(port, "GET", "/thing", token="x" if i % 2 else None)
            codes.append(s)
        assert codes == [401, 401, 401, 429, 429], codes
    serve(t, rate=0.01, burst=3)


def test_bad_rate_config_rejected():
    web, _ = make_web()
    fwtest.raises(ValueError, web.configure, {"rate_per_s": 0})
    e = fwtest.raises(ValueError, web.configure, {"burst": "many"})
    assert "api.burst" in str(e)


def test_garbage_and_resets_do_not_kill_server():
    async def t(web, port, state):
        for junk, status in ((b"\x00\xff garbage\r\n\r\n", b"400"), (b"GET\r\n\r\n", b"400"),
                             (b"GET / HTTP/1.1\r\nBadHeader\r\n\r\n", b"400"),
                             (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", b"414")):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(junk)
            await w.drain()
            raw = await wc.read_all(r)
            await wc.close(w)
            assert raw == b"" or raw.startswith(b"HTTP/1.0 " + status), raw
        # a client that connects and vanishes mid-request
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /thing HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        await w.drain()
        await wc.close(w)
        await asyncio.sleep(0.05)
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 200 and b["status"] == "ok"
        assert web.active == 0
    serve(t)


def test_connection_cap_answers_503_and_slow_clients_time_out():
    async def t(web, port, state):
        web.read_timeout_s = 0.3
        held = []
        for _ in range(web.max_connections):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\n")  # never finishes its headers
            await w.drain()
            held.append((r, w))
        await asyncio.sleep(0.05)
        assert web.active == web.max_connections
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 503 and b == {"error": "too many connections"} and h["retry-after"] == "1"
        assert web.refused == 1
        for r, w in held:  # the silent clients get 408 and lose their socket
            raw = await wc.read_all(r)
            assert raw.startswith(b"HTTP/1.0 408")
            await wc.close(w)
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 200 and web.active == 0
    serve(t)


def test_streamed_answer_goes_through_the_head_buffer_and_is_exact_across_writes():
    # /metrics goes out through the head buffer allocated at start (no bytes object grown chunk by chunk: on a
    # fragmented heap that asked for ever larger blocks), or a stream_write one while it is taken; a chunk longer than
    # the buffer, chunks that end exactly on its boundary and two answers at once must all come out byte for byte.
    async def t(web, port, state):
        reg = web._registry
        reg.gauge("long_help", "x" * (3 * web.stream_write)).set(1)  # spans writes of a stream_write buffer
        for i in range(30):
            reg.gauge("g_%d" % i, "A gauge.").set(i)
        r1, r2 = await asyncio.gather(wc.request(port, "GET", "/metrics", token=token("viewer")),
                                      wc.request(port, "GET", "/metrics", token=token("viewer")))
        for s, h, b in (r1, r2):
            assert s == 200 and "long_help 1" in b and "g_29 29" in b
            assert b.split("iotlib_http_requests_total")[0] == reg.render().split("iotlib_http_requests_total")[0]
        buf = web._head
        assert isinstance(buf, bytearray) and len(buf) == web.max_head + 4
        s, h, b = await wc.request(port, "GET", "/metrics", token=token("viewer"))
        assert s == 200 and "long_help 1" in b and web._head is buf  # the same buffer served the next answer
    serve(t)


def test_health_ready_info_metrics_reboot():
    ready = {"ok": False}
    rebooted = []

    async def t(web, port, state):
        s, h, b = await wc.request(port, "GET", "/ready")
        assert s == 503 and b == {"ready": False, "registered": False}
        ready["ok"] = True
        s, h, b = await wc.request(port, "GET", "/ready")
        assert s == 200 and b["ready"] is True
        s, h, b = await wc.request(port, "GET", "/info")
        assert s == 401
        s, h, b = await wc.request(port, "GET", "/info", token=token("viewer"))
        assert s == 200 and b == {"device_id": DEV}
        s, h, b = await wc.request(port, "GET", "/metrics", token=token("viewer"))
        assert s == 200 and h["content-type"].startswith("text/plain; version=0.0.4")
        assert 'iotlib_http_requests_total{code="200"}' in b
        # written in chunks as it is rendered (never the whole answer in one block), yet the same text
        for i in range(40):
            web._registry.gauge("bulk_%d" % i, "A gauge to make the answer span several writes.").set(i)
        s, h, b = await wc.request(port, "GET", "/metrics", token=token("viewer"))
        assert s == 200 and len(b) > 3 * web.stream_write and "bulk_39 39" in b
        assert b.split("iotlib_http_requests_total")[0] == web._registry.render().split("iotlib_http_requests_total")[0]
        s, h, b = await wc.request(port, "POST", "/reboot", token=token("operator"))
        assert s == 403 and rebooted == []
        s, h, b = await wc.request(port, "POST", "/reboot", token=token("admin"))
        assert s == 202 and b == {"rebooting": True}
        for _ in range(50):
            if rebooted:
                break
            await asyncio.sleep(0.02)
        assert rebooted == [True]
    serve(t, ready=lambda: (ready["ok"], {"registered": ready["ok"]}), info=lambda: {"device_id": DEV},
          on_reboot=lambda: rebooted.append(True))


def test_requests_split_anywhere_or_sent_with_the_body_in_one_segment_are_parsed():
    # DeviceWeb reads a connection in blocks and splits lines itself: a header line split across segments, and the
    # headers and body arriving in one segment, must both come out whole.
    async def t(web, port, state):
        body = b'{"n": 7}'
        req = (b"POST /thing HTTP/1.0\r\nAuthorization: Bearer " + token("operator").encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for i in range(0, len(req), 7):
            w.write(req[i:i + 7])
            await w.drain()
            await asyncio.sleep(0.002)
        raw = await wc.read_all(r)
        await wc.close(w)
        assert raw.startswith(b"HTTP/1.0 200 OK\r\n"), raw
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1]) == {"n": 7} and state["n"] == 7
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req.replace(b'"n": 7', b'"n": 8'))  # all in one write
        await w.drain()
        raw = await wc.read_all(r)
        await wc.close(w)
        assert raw.startswith(b"HTTP/1.0 200 OK\r\n") and state["n"] == 8, raw
    serve(t)


def test_running_out_of_heap_while_reading_a_request_answers_503_and_the_server_goes_on():
    from iotlib import httpd
    real = httpd._Request.create
    calls = {"n": 0}

    async def create_oom(*args, **kw):  # fault injection: the heap is gone while the device parses this request
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("memory allocation failed")
        return await real(*args, **kw)

    async def t(web, port, state):
        from iotlib import metrics
        before = metrics.MEM_ERRORS.get("request", 0)  # other tests of this run may have counted some
        httpd._Request.create = create_oom
        try:
            s, h, b = await wc.request(port, "GET", "/health")
            assert s == 503 and b == {"error": "out of memory"} and h["retry-after"] == "1"
            assert web.oom == 1 and web.active == 0
            n = before + 1
            assert '\niotlib_memory_errors_total{where="request"} %d\n' % n in metrics.REGISTRY.render()
            s, h, b = await wc.request(port, "GET", "/health")  # the next request is served as ever
            assert s == 200 and b["status"] == "ok"
        finally:
            httpd._Request.create = real
    serve(t)


def test_reader_takes_heads_split_anywhere_and_serves_what_came_after_them():
    from iotlib.httpd import _Reader

    class Src:  # hands out the data a few bytes at a time, like a socket under load
        def __init__(self, data, step):
            self.data, self.step = data, step

        async def read(self, n=-1):
            k = min(n if n >= 0 else self.step, self.step)
            out, self.data = self.data[:k], self.data[k:]
            return out

        async def readexactly(self, n):
            if len(self.data) < n:
                raise EOFError
            out, self.data = self.data[:n], self.data[n:]
            return out

    class SrcInto(Src):  # MicroPython's stream: readinto() fills the caller's buffer
        async def readinto(self, buf):
            out = await self.read(len(buf))
            buf[:len(out)] = out
            return len(out)

    head = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
    data = head + b"0123456789" + b"tail"
    for kind in (Src, SrcInto):
        for step in (1, 3, 7, 64):
            for size in (4, 16, 4100):  # a head_block buffer grows; the preallocated one (max_head + 4) does not

                async def go():
                    r = _Reader(kind(data, step))
                    buf, e = await r.readhead(bytearray(size), 4096, 2048)
                    assert bytes(buf[:e]) == head, (kind, step, size, bytes(buf[:e]))
                    assert await r.readexactly(4) == b"0123"
                    got = b""
                    while len(got) < 6:
                        got += await r.read(6 - len(got))
                    assert got == b"456789"
                    rest = b""
                    while True:
                        c = await r.read()
                        if not c:
                            break
                        rest += c
                    assert rest == b"tail", rest
                    buf, e = await _Reader(kind(b"PUT /b HTTP/1.0\n\nrest", step)).readhead(bytearray(size), 4096, 2048)
                    assert bytes(buf[:e]) == b"PUT /b HTTP/1.0\n\n"  # a bare-LF head
                    try:
                        await _Reader(kind(b"GET / HTTP/1.0\r\nHost", step)).readhead(bytearray(size), 4096, 2048)
                        assert False, "a head cut short must raise"
                    except EOFError:
                        pass
                    try:
                        await r.readexactly(5)
                        assert False, "EOF must raise"
                    except EOFError:
                        pass
                    assert await _Reader(kind(b"", step)).readhead(bytearray(size), 4096, 2048) is None
                    for over, code in ((b"x" * 40, 414), (b"GET / HTTP/1.0\r\n" + b"x" * 40, 431)):
                        try:
                            await _Reader(kind(over, step)).readhead(bytearray(size), 24, 20)
                            assert False, "a head over the limit must raise"
                        except ValueError as e:
                            assert e.args[0] == code, (over, e.args)
                fwtest.run(go())



def test_stop_closes_every_connection_it_accepted():
    # A connection still sending its head and one handed over to a session (detach) are closed by stop(): nothing the
    # server accepted outlives it (the first would get its 408 only after read_timeout_s, the second stayed open).
    held = {}

    async def t(web, port, state):
        async def hold(req):
            held["conn"] = web.detach(req)  # an owner that never releases it
            return HANDLED
        web.route("/hold", None, hold)
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"GET /hold HTTP/1.0\r\n\r\n")
        await w1.drain()
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET /health HTTP/1.0\r\nX-Slow: ")
        await w2.drain()
        while "conn" not in held or web.active < 2:
            await asyncio.sleep(0.01)
        await web.stop()
        assert web.active == 0, web.active
        for r, w in ((r1, w1), (r2, w2)):
            try:
                out = await wc.read_all(r)
            except OSError:  # reset: the close found unread bytes
                out = b""
            await wc.close(w)
            assert out == b"", out
    serve(t)


def test_running_out_of_heap_while_building_an_answer_answers_503_not_silence():
    async def t(web, port, state):
        real = web._write
        calls = {"n": 0}

        async def write_oom(res, writer):  # fault injection: the heap is gone while the answer is formatted
            calls["n"] += 1
            if calls["n"] == 1:
                raise MemoryError("memory allocation failed")
            await real(res, writer)
        web._write = write_oom
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 503 and b == {"error": "out of memory"} and h["retry-after"] == "1", (s, b)
        assert web.oom == 1 and web.active == 0
        s, h, b = await wc.request(port, "GET", "/health")  # the next request is served as ever
        assert s == 200 and b["status"] == "ok"
    serve(t)


def test_a_query_string_stays_its_own_while_other_requests_are_read():
    # A query string is read from the head buffer when a handler asks for it: requests read meanwhile (into the buffer
    # freed by a request without one, or into one of their own) must not change it.
    async def t(web, port, state):
        async def q(req):
            if req.in_query(b"slow"):
                await asyncio.sleep(0.3)  # other requests are read meanwhile
            return {"q": req.query()}
        web.route("/q", None, q)

        async def later(path):
            await asyncio.sleep(0.1)  # accepted once the first request is parsed and in its handler
            return await wc.request(port, "GET", path)
        got = await asyncio.gather(wc.request(port, "GET", "/q?slow"), later("/health"), later("/q?other"))
        assert [g[2] for g in got] == [{"q": "slow"}, got[1][2], {"q": "other"}] and got[1][0] == 200, got
        assert (await wc.request(port, "GET", "/q"))[2] == {"q": None}
    serve(t)
