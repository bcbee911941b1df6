# Real network peers for the firmware suite (both runtimes): TCP servers on 127.0.0.1 from asyncio.start_server, a tiny
# JSON-over-HTTP app wrapper, and a UDP socket helper. MicroPython's start_server cannot report an ephemeral port, so
# ports are picked from a random range and retried.
import json
import os

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio


# a trustme test CA, base64 DER as provisioning writes it
TEST_CA_B64 = ("MIIByTCCAW+gAwIBAgIUS5UeqIQnWhtMaruni6E+qU3t3DUwCgYIKoZIzj0EAwIwQDEXMBUGA1UECgwOdHJ1c3RtZSB2MS4yLjEx"
               "JTAjBgNVBAsMHFRlc3RpbmcgQ0EgI0xJbmxtTkFnU05GYS1ZUTcwIBcNMDAwMTAxMDAwMDAwWhgPMzAwMDAxMDEwMDAwMDBaMEAx"
               "FzAVBgNVBAoMDnRydXN0bWUgdjEuMi4xMSUwIwYDVQQLDBxUZXN0aW5nIENBICNMSW5sbU5BZ1NORmEtWVE3MFkwEwYHKoZIzj0C"
               "AQYIKoZIzj0DAQcDQgAEDzhBi3KHEFsKHkKVrPv45SspV6plVIlDOHt5NlmK1eeXRjxJAKxZr/fMm3R5uHZjt6gC2293uZItSNBY"
               "F/kAbKNFMEMwHQYDVR0OBBYEFIb5Lj8iqPXvwCowh2PUgU8Hb6WdMBIGA1UdEwEB/wQIMAYBAf8CAQkwDgYDVR0PAQH/BAQDAgGG"
               "MAoGCCqGSM49BAMCA0gAMEUCIAXkJ1ePnHMjTUTvW2qBclrTn40dZTmI1jjdxd5EUiT4AiEAsCfNjABpuH3pF8pqQZOJmUKMVXMQ"
               "Yj+cB45ZoeZq7iY=")


def _base_port():
    b = os.urandom(2)
    return 20000 + ((b[0] << 8) | b[1]) % 30000


async def serve(handler):
    """(server, port) for a stream handler bound on 127.0.0.1."""
    base = _base_port()
    last = None
    for i in range(40):
        try:
            srv = await asyncio.start_server(handler, "127.0.0.1", base + i)
            return srv, base + i
        except OSError as e:
            last = e
    raise last


async def stop(srv):
    srv.close()
    await srv.wait_closed()


async def close(writer):
    try:
        writer.close()
        await writer.wait_closed()
    except Exception:
        pass


async def read_request(reader):
    """(method, path, headers{lower: value}, body bytes) of one HTTP request."""
    line = await reader.readline()
    if not line:
        return None
    method, path = line.decode().split()[:2]
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, v = h.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return method, path, headers, body


def response(status, obj=None, extra=""):
    body = b"" if obj is None else json.dumps(obj).encode()
    head = "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
        status, len(body), extra)
    return head.encode() + body


class App:
    """An HTTP peer: fn(method, path, headers, json_or_None) → (status, obj). Requests are logged in .log."""

    def __init__(self, fn):
        self.fn = fn
        self.log = []
        self.srv = None
        self.port = None

    async def _handle(self, reader, writer):
        try:
            req = await read_request(reader)
            if req is None:
                return
            method, path, headers, body = req
            doc = json.loads(body) if body else None
            self.log.append((method, path, headers, doc))
            status, obj = self.fn(method, path, headers, doc)
            writer.write(response(status, obj))
            await writer.drain()
        finally:
            await close(writer)

    async def start(self):
        self.srv, self.port = await serve(self._handle)
        return "http://127.0.0.1:%d" % self.port

    async def stop(self):
        await stop(self.srv)
