# The device API's documented limits (docs/device-api.yaml): everything within them is served, everything beyond them
# gets its 4xx (414 request line, 431 head, 413 body) — never silence, never a 503 that cannot succeed.
import fwtest
import webclient as wc
from iotlib.compat import asyncio
from test_web import make_web, serve, token


async def raw(port, data):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = await wc.read_all(r)
    await wc.close(w)
    return out


def test_a_long_path_under_a_pattern_route_is_answered():
    async def t(web, port, state):
        async def one(req, name):
            return {"name": name}
        web.route("/gpio/<name>", None, one)
        out = await raw(port, b"GET /gpio/r1 HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 ") and out.endswith(b'{"name": "r1"}'), out
        for n in (1000, 2000):  # within the request-line limit (2048): routed, however long
            out = await raw(port, b"GET /gpio/" + b"a" * n + b" HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.0 200 "), (n, out[:80])
        out = await raw(port, b"GET /gpio/" + b"a/" * 900 + b" HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 404 "), out[:80]
        out = await raw(port, b"GET /gpio/r1 HTTP/1.0\r\n\r\n")  # and the server goes on
        assert out.startswith(b"HTTP/1.0 200 "), out
    serve(t)


def test_request_line_and_head_limits_are_the_documented_4xx():
    tok = token("viewer").encode()

    async def t(web, port, state):
        line = b"GET /thing?" + b"x" * (2048 - len(b"GET /thing? HTTP/1.0")) + b" HTTP/1.0"
        assert len(line) == 2048
        out = await raw(port, line + b"\r\nAuthorization: Bearer " + tok + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 "), out[:80]  # at the limit: served
        out = await raw(port, b"GET /thing?" + b"x" * 2100 + b" HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 414 ") and b'"error"' in out, out[:80]
        out = await raw(port, b"GET /thing HTTP/1.0\r\nX-Pad: " + b"a" * 8192 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 431 ") and b'"error"' in out, out[:80]
        out = await raw(port, b"GET /thing HTTP/1.0\r\nAuthorization: Bearer " + tok + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.0 200 "), out[:80]
    serve(t)
