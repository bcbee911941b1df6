# The device's own request parse, route lookup and answer (iotlib.httpd._Request, DeviceWeb._find, httpd.Response): kept
# apart from test_web so neither module's bytecode crowds the other's tests out of a 192K heap.
import json

import fwtest
import webclient as wc
from iotlib.compat import asyncio
from test_web import make_web, serve, token


def test_header_names_in_any_case_bare_lf_heads_head_and_405_on_a_fixed_path():
    # DeviceWeb parses the head itself (iotlib.httpd._Request): names are matched in any case, a bare-LF head and a
    # header without the space after its colon are taken; a fixed path is found by one lookup, and HEAD, a query
    # string and a wrong method there still get their answers.
    tok = token("viewer").encode()

    async def t(web, port, state):
        seen = {}

        async def echo(req):
            h = req.headers
            seen.update(dict(h.items()), has=("X-Thing" in h, "x-thing" in h, "nope" in h), get=h.get("X-THING"))
            return {"n": h["x-thing"]}
        web.route("/echo", None, echo)
        out = await wc.raw(port, b"GET /echo HTTP/1.0\r\nX-Thing: a b  \r\nHost: d\r\n\r\n")
        assert out.endswith(b'{"n": "a b"}'), out
        assert seen == {"x-thing": "a b", "host": "d", "has": (True, True, False), "get": "a b"}, seen
        for req in (b"GET /thing HTTP/1.0\r\nauthorization: Bearer " + tok + b"\r\n\r\n",
                    b"GET /thing HTTP/1.0\nAUTHORIZATION:Bearer " + tok + b"  \nX-Empty:\n\n",
                    b"GET /thing?verbose=1 HTTP/1.0\r\nAuthorization:   Bearer " + tok + b"\r\n\r\n"):
            out = await wc.raw(port, req)
            assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b'{"n": 0}'), (req, out)
        out = await wc.raw(port, b"HEAD /thing HTTP/1.0\r\nAuthorization: Bearer " + tok + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b"\r\n\r\n"), out
        out = await wc.raw(port, b"DELETE /thing HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 405 Method Not Allowed\r\n"), out
        allow = out.split(b"\r\nAllow: ", 1)[1].split(b"\r\n", 1)[0]  # RFC 9110: a 405 names what is allowed
        assert sorted(allow.split(b", ")) == [b"GET", b"HEAD", b"POST"], out
        assert json.loads(out.split(b"\r\n\r\n", 1)[1]) == {"error": "method not allowed"}
        out = await wc.raw(port, b"GET /thing HTTP/1.0\r\nNoColonHere\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 400 "), out
        for n in (b"-5", b"five"):  # a Content-Length that is no length: 400, not a read of what was never sent
            out = await wc.raw(port, b"POST /thing HTTP/1.0\r\nAuthorization: Bearer " + token("operator").encode() +
                            b"\r\nContent-Length: " + n + b"\r\n\r\n{}")
            assert out.startswith(b"HTTP/1.0 400 ") and b"malformed request" in out, (n, out)
        pad = b"X-Pad: " + b"a" * 1500 + b"\r\n"
        out = await wc.raw(port, b"GET /thing HTTP/1.0\r\n" + pad * 3 + b"\r\n")  # a head over max_head (4096)
        assert out.startswith(b"HTTP/1.0 431 ") and b"request headers too large" in out, out
        out = await wc.raw(port, b"GET /thing HTTP/1.0\r\nAuthorization: Bearer " + tok + b"\r\n" + pad * 2 + b"\r\n")
        assert out.startswith(b"HTTP/1.0 200 OK\r\n"), out  # long headers within it are fine
    serve(t)


def test_an_authenticated_request_leaves_little_garbage():
    # What one authenticated GET allocates on MicroPython sets how often the collector scans the whole heap, and on
    # a device whose code is most of the heap that scan was the gap to microdot's hello world (docs/benchmarks.md,
    # Device API). microdot's Request.create/__init__, find_route, NoCaseDict headers and the answer built header by
    # header came to ≈ 10.2K here (at 6d66581); the device's own parse, lookup and answer ≈ 5.7K.
    import gc
    if not hasattr(gc, "mem_alloc"):
        return  # CPython: no GC heap to measure
    req = b"GET /thing HTTP/1.0\r\nHost: device\r\nAuthorization: Bearer " + token("viewer").encode() + b"\r\n\r\n"

    class Reader:
        def __init__(self):
            self.data = req

        async def read(self, n=-1):
            out, self.data = self.data, b""
            return out

    class Writer:
        out = b""

        async def awrite(self, b):
            Writer.out = bytes(b)

        async def aclose(self):
            pass

        def get_extra_info(self, k):
            return ("127.0.0.1", 40000)

    async def go():
        web, state = make_web()
        used = []
        for i in range(6):
            r, w = Reader(), Writer()
            gc.collect()
            gc.disable()
            a = gc.mem_alloc()
            await web._handle(r, w)
            used.append(gc.mem_alloc() - a)
            gc.enable()
            assert Writer.out.startswith(b"HTTP/1.0 200 OK\r\n") and Writer.out.endswith(b'{"n": 0}'), Writer.out
        await web.stop()
        per_request = min(used[2:])  # the first ones also make what is kept (the JWT remembered, series keys)
        assert per_request < 6500, used
    fwtest.run(go())
