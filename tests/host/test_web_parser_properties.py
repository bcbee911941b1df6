"""Property tests of the device's request parser and connection handler (iotlib.web on CPython, hypothesis): whatever
bytes a client sends, the connection gets an HTTP answer or a clean close, never a crash, and the server serves the
next request. The cases that once broke the device (a 1,000-character path, lines and heads over the limits, slow
clients) are replayed under the unix micropython at 192K by tests/firmware/test_web_limits."""
from __future__ import annotations

import asyncio
import os
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
for p in (os.path.join(REPO, "firmware"), os.path.join(REPO, "tests", "firmware")):
    if p not in sys.path:
        sys.path.insert(0, p)

from iotlib.web import DeviceWeb  # noqa: E402

_TOKENS = [b"GET", b"POST", b" ", b"/", b"/gpio/", b"<x>", b"?", b"token=", b"&", b"=", b"%", b"%00", b"\r\n", b"\n",
           b":", b"HTTP/1.0", b"HTTP/1.1", b"Content-Length: ", b"-1", b"99999", b"Authorization: Bearer ", b"a" * 700,
           b"\x00", b"\xff", b"\r\n\r\n"]
requests = st.one_of(st.binary(max_size=3000),
                     st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join))


async def _exchange(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        if w.can_write_eof():
            w.write_eof()
        out = b""
        while True:
            chunk = await asyncio.wait_for(r.read(4096), 10)
            if not chunk:
                return out
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        w.close()


async def _serve_and_check(payloads):
    web = DeviceWeb(lambda b: {"role": "admin", "sub": "t", "exp": 2**40})
    web.configure({"rate_per_s": 100000, "burst": 100000})

    async def one(req, name):
        return {"name": name}
    web.route("/gpio/<name>", None, one)
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    await web.start("127.0.0.1", port)
    try:
        for data in payloads:
            out = await _exchange(port, data)
            assert out == b"" or out.startswith(b"HTTP/1."), out[:200]
            if out:
                status = int(out.split(b" ", 2)[1])
                assert status != 500 and (status < 500 or status == 503), out[:300]
            ok = await _exchange(port, b"GET /gpio/r1 HTTP/1.0\r\n\r\n")  # and the next request is served
            assert ok.startswith(b"HTTP/1.0 200 ") and ok.endswith(b'{"name": "r1"}'), ok[:200]
    finally:
        await web.stop()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=requests)
def test_any_bytes_get_an_answer_or_a_clean_close_and_the_server_goes_on(data):
    asyncio.run(_serve_and_check([data]))
