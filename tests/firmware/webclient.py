# A tiny HTTP/1.0 + WebSocket client on asyncio streams for the dual-runtime device API tests (real sockets on
# 127.0.0.1, same code on CPython and MicroPython).
import json
import os
from iotlib.compat import asyncio


def _port():
    b = os.urandom(2)
    return 20000 + ((b[0] << 8) | b[1]) % 30000


async def start(web, tries=20):
    """Start a DeviceWeb on 127.0.0.1 at a free port from a range (port 0 is not portable); return the port."""
    last = None
    for _ in range(tries):
        port = _port()
        try:
            await web.start("127.0.0.1", port)
            return port
        except OSError as e:
            last = e
    raise last


async def close(w):
    try:
        w.close()
        await w.wait_closed()
    except Exception:
        pass


async def raw(port, data):
    """Send raw bytes on a new connection; everything the device answered until it closed."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = await read_all(r)
    await close(w)
    return out


async def read_all(r):
    # chunks joined once at the end: an answer regrown 512 bytes at a time asks a fragmented 192K heap for ever
    # larger blocks, and the test client, not the device, ran out of memory
    parts = []
    while True:
        chunk = await r.read(512)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def parse(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {":version": lines[0].split()[0], ":reason": lines[0].split(" ", 2)[-1]}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


async def request(port, method, path, token=None, body=None, headers=None, raw_body=None):
    """(status, headers{lower-case}, parsed JSON or text body)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    h = "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method, path)
    if token:
        h += "Authorization: Bearer %s\r\n" % token
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
    if data:
        h += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    for k in headers or {}:
        h += "%s: %s\r\n" % (k, headers[k])
    w.write(h.encode() + b"\r\n" + data)
    await w.drain()
    raw = await read_all(r)
    await close(w)
    status, hdrs, b = parse(raw)
    if hdrs.get("content-type", "").startswith("application/json"):
        b = json.loads(b)
    else:
        b = b.decode()
    return status, hdrs, b


# --- WebSocket ---
class WSClient:
    def __init__(self, r, w):
        self.r, self.w = r, w

    async def send(self, text, opcode=1):
        payload = text.encode() if isinstance(text, str) else text
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        else:
            head += bytes([0x80 | 126, n >> 8, n & 0xFF])
        masked = bytes(payload[i] ^ mask[i % 4] for i in range(n))
        self.w.write(head + mask + masked)
        await self.w.drain()

    async def recv(self):
        """(opcode, payload bytes); (None, b"") when the connection closed."""
        h = await self.r.read(2)
        if len(h) < 2:
            return None, b""
        n = h[1] & 0x7F
        if n == 126:
            x = await self.r.readexactly(2)
            n = (x[0] << 8) | x[1]
        elif n == 127:
            x = await self.r.readexactly(8)
            n = int.from_bytes(x, "big")
        data = await self.r.readexactly(n) if n else b""
        return h[0] & 0x0F, data

    async def recv_json(self):
        while True:
            op, data = await self.recv()
            if op is None:
                return None
            if op == 1:
                return json.loads(data)

    async def close(self):
        await close(self.w)


async def ws_connect(port, path="/ws", token=None, protocols=None):
    """(status, headers, WSClient or None): 101 gives a client, anything else the HTTP answer's headers."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    h = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n") % path
    if token:
        h += "Authorization: Bearer %s\r\n" % token
    if protocols:
        h += "Sec-WebSocket-Protocol: %s\r\n" % ", ".join(protocols)
    w.write(h.encode() + b"\r\n")
    await w.drain()
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = await r.read(1)
        if not c:
            break
        head += c
    status, hdrs, _ = parse(head)
    if status != 101:
        rest = await read_all(r)
        await close(w)
        body = json.loads(rest) if rest else None
        return status, hdrs, body
    return status, hdrs, WSClient(r, w)
