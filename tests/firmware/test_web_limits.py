# The device API's documented limits (docs/device-api.yaml): everything within them is served, everything beyond them
# gets its 4xx (414 request line, 431 head, 413 body) — never silence, never a 503 that cannot succeed.
import fwtest
import webclient as wc
from iotlib.compat import asyncio
from test_web import make_web, serve, token


def test_a_long_path_under_a_pattern_route_is_answered():
    async def t(web, port, state):
        async def one(req, name):
            return {"name": name}
        web.route("/gpio/<name>", None, one)
        out = await wc.raw(port, b"GET /gpio/r1 HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 ") and out.endswith(b'{"name": "r1"}'), out
        for n in (1000, 2000):  # within the request-line limit (2048): routed, however long
            out = await wc.raw(port, b"GET /gpio/" + b"a" * n + b" HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.0 200 "), (n, out[:80])
        out = await wc.raw(port, b"GET /gpio/" + b"a/" * 900 + b" HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 404 "), out[:80]
        out = await wc.raw(port, b"GET /gpio/r1 HTTP/1.0\r\n\r\n")  # and the server goes on
        assert out.startswith(b"HTTP/1.0 200 "), out
    serve(t)


def test_request_line_and_head_limits_are_the_documented_4xx():
    tok = token("viewer").encode()

    async def t(web, port, state):
        line = b"GET /thing?" + b"x" * (2048 - len(b"GET /thing? HTTP/1.0")) + b" HTTP/1.0"
        assert len(line) == 2048
        out = await wc.raw(port, line + b"\r\nAuthorization: Bearer " + tok + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 "), out[:80]  # at the limit: served
        out = await wc.raw(port, b"GET /thing?" + b"x" * 2100 + b" HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 414 ") and b'"error"' in out, out[:80]
        out = await wc.raw(port, b"GET /thing HTTP/1.0\r\nX-Pad: " + b"a" * 8192 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 431 ") and b'"error"' in out, out[:80]
        out = await wc.raw(port, b"GET /thing HTTP/1.0\r\nAuthorization: Bearer " + tok + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 "), out[:80]
    serve(t)


def test_anonymous_calls_do_not_use_up_an_authenticated_callers_bucket():
    async def t(web, port, state):
        for _ in range(30):
            await wc.request(port, "GET", "/health")
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 429  # the address's bucket is empty
        s, h, b = await wc.request(port, "GET", "/thing", token=token("operator"))
        assert s == 200, (s, b)  # the operator, from the same address, has a bucket of its own
        # both kinds of key in one table are text: a bytes address beside the subs made the unix port warn
        # "Comparison between bytes and str" on colliding lookups
        assert sorted(web._limiter._b) == ["127.0.0.1", "tester"], list(web._limiter._b)
    serve(t, rate=0.01, burst=20)


def test_slow_clients_holding_every_connection_make_room_for_new_ones():
    async def t(web, port, state):
        web.read_timeout_s = 30  # the slow clients would hold their sockets this long
        web.evict_after_s = 0.2
        held = []
        for _ in range(web.max_connections):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\nX-Slow: ")  # and never more
            await w.drain()
            held.append((r, w))
        await asyncio.sleep(0.3)
        assert web.active == web.max_connections
        for _ in range(web.max_connections + 2):  # every new request is served
            s, h, b = await wc.request(port, "GET", "/health")
            assert s == 200, (s, b)
        # the first took the place of the oldest slow client, which got 408 and lost its socket
        assert web.evicted == 1 and web.refused == 0
        raw = await wc.read_all(held[0][0])
        assert raw.startswith(b"HTTP/1.0 408"), raw
        for r, w in held:
            await wc.close(w)
        held = []
        await asyncio.sleep(0.1)
        # connections younger than evict_after_s are not evicted: a burst beyond the cap still gets 503
        web.evict_after_s = 30
        for _ in range(web.max_connections):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\n")
            await w.drain()
            held.append((r, w))
        await asyncio.sleep(0.05)
        s, h, b = await wc.request(port, "GET", "/health")
        assert s == 503 and h["retry-after"] == "1"
        for r, w in held:
            await wc.close(w)
    serve(t)


def test_a_head_up_to_the_limit_is_read_on_a_fragmented_heap_and_one_over_it_is_refused():
    # The head is read into one buffer allocated at start (max_head + 4 bytes) and parsed there: a head within the
    # limit needs no block of the heap, one over it is refused (431), though no free block could hold either whole.
    # Joining the head's pieces asked the heap for one block of the head's size, and a fragmented heap answered
    # MemoryError (then a 503 that a retry cannot fix).
    import gc
    from iotlib.httpd import _Reader

    class Blocks:  # a client sending its head 512 bytes at a time
        def __init__(self, data):
            self.data = data
            self.at = 0

        async def read(self, n=-1):
            k = min(512, n) if n >= 0 else 512
            self.at += k
            return self.data[self.at - k:self.at]

    pad = b"X-Pad: " + b"a" * 1500 + b"\r\n"
    over = b"GET /thing HTTP/1.0\r\n" + pad * 3 + b"\r\n"
    within = b"GET /thing?" + b"q" * 2000 + b" HTTP/1.0\r\n" + pad + b"\r\n"
    sent = within + b"body"
    buf = bytearray(4096 + 4)  # as Server.start() allocates it
    held = []
    if hasattr(gc, "mem_alloc"):  # MicroPython: fill the heap with 1K blocks, then free every other one
        try:
            while True:
                held.append(bytearray(1000))
        except MemoryError:
            pass
        for i in range(0, len(held), 2):
            held[i] = None
        gc.collect()

    async def go():
        try:
            await _Reader(Blocks(over)).readhead(buf, 4096, 2048)
        except ValueError as e:
            code = e.args[0]
        b, e = await _Reader(Blocks(sent)).readhead(buf, 4096, 2048)
        return code, b is buf and e == len(within) and b.find(within, 0, e) == 0
    try:
        code, ok = fwtest.run(go())
    finally:
        held = None
    assert code == 431, code
    assert ok
