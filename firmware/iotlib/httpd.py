# The device API's transport: a small HTTP/1.0 server on asyncio streams. It reads a request's head into one buffer
# allocated at start, parses it from there, reads the body, hands the request to the policy (Server._dispatch,
# implemented by iotlib.web.DeviceWeb: roles, rate limits, routes, JSON errors) and writes or streams the answer it
# returns, then closes the connection. It keeps microdot's handler conventions (a body, (body, status),
# (body, status, headers) or a status) but none of its code: microdot's other features would only take a Pico W's heap
# and interned names (docs/benchmarks.md). What it guards against before the hand-over: too many connections (503),
# heads over the documented limits (414/431), heads that do not arrive in time (408), malformed heads (400), a heap
# that ran out while reading (503 + Retry-After); nothing a client does stops the server.
import gc
import json
from iotlib.compat import asyncio, ticks_ms, ticks_diff, ticks_add, memory_error, stream_writer
from iotlib import log as _logmod

_log = _logmod.get("web")

_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 414: "URI Too Long", 429: "Too Many Requests", 500: "Internal Server Error",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_TOO_LARGE = {414: "URI too long", 431: "request headers too large"}  # ValueError(414/431): a head over the limits


class _Reader:
    """A connection's reader: the head straight into a buffer (readhead); what came after it in the same reads, copied
    out (the buffer serves the next connection), first by readexactly()/read() (the body, a WebSocket's frames)."""
    __slots__ = ("_r", "_rest")

    def __init__(self, stream):
        self._r = stream
        self._rest = b""

    async def readhead(self, buf, limit, line):
        """A head read into buf (a bytearray; a smaller one than limit + 4 is replaced as the head grows) → (buf, its
        length with the blank line; bare LFs taken too); None for a connection closed before anything came.
        ValueError(414) past `line` bytes of request line, (431) past `limit` bytes of head; EOFError mid-head."""
        r = self._r
        into = getattr(r, "readinto", None)  # MicroPython: into the buffer, no bytes object per read
        mv = memoryview(buf)
        n = 0
        while True:
            if n == len(buf):  # a head_block buffer (limit + 4 bytes would have ended or raised below)
                b2 = bytearray(min(2 * n, limit + 4))
                b2[:n] = buf
                buf = b2
                mv = memoryview(buf)
            if into is not None:
                k = await into(mv[n:])
                if k is None:  # woken without data
                    continue
            else:
                c = await r.read(len(buf) - n)
                k = len(c)
                buf[n:n + k] = c
            if not k:
                if n:
                    raise EOFError("connection closed mid-request")
                return None
            a = n - 3 if n > 3 else 0  # the blank line may straddle two reads
            n += k
            i = buf.find(b"\r\n\r\n", a, n)
            t = 4
            j = buf.find(b"\n\n", a, n)
            if i < 0 or 0 <= j < i:
                i, t = j, 2
            nl = buf.find(b"\n", 0, n)
            if (i if i >= 0 else n) > limit:
                raise ValueError(414 if nl < 0 or nl > line + 1 else 431)
            if nl < 0 and n > line + 1:
                raise ValueError(414)  # refused as soon as the request line is too long, not at the head's limit
            if i >= 0:
                if i + t < n:
                    self._rest = bytes(mv[i + t:n])
                return buf, i + t

    async def readexactly(self, n):
        p = self._rest
        if len(p) >= n:
            self._rest = p[n:]
            return p[:n]
        self._rest = b""
        return p + await self._r.readexactly(n - len(p))

    async def read(self, n=-1):
        p = self._rest
        if not p:
            return await self._r.read(n)
        n = len(p) if n < 0 else n
        self._rest = p[n:]
        return p[:n]


class _Headers:
    """A request's headers, names lower-cased as parsed; lookups take any case (a lower-case one costs no copy)."""
    __slots__ = ("_d",)

    def __init__(self, d):
        self._d = d

    def get(self, name, default=None):
        v = self._d.get(name)
        return v if v is not None else self._d.get(name.lower(), default)

    def __getitem__(self, name):
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __contains__(self, name):
        return self.get(name) is not None

    def items(self):
        return self._d.items()


class _Request:
    """A request, made in one pass over its head (create). What a request does not use stays a class default: less
    garbage per request, fewer scans of the whole heap (docs/benchmarks.md, Device API)."""
    _q = None  # (head buffer, start, end) of the query string, decoded only when read; None without one
    content_length = 0
    body = b""
    claims = None  # the caller's token claims, set by DeviceWeb.check
    url_args = {}  # of a fixed-path route (never written to)

    def __init__(self, client_addr, method, path, query, headers, sock):
        """headers: {lower-case name: value}; query: (head, start, end) of what follows "?", or None."""
        self.client_addr = client_addr
        self.method = method
        self.path = path
        self._q = query
        self.headers = _Headers(headers)
        self.sock = sock
        n = headers.get("content-length")
        if n is not None:
            self.content_length = int(n)

    @property
    def g(self):
        # microdot's per-request namespace: handlers read req.g.claims; the request itself holds them (no object more)
        return self

    def query(self):
        """The query string (what follows "?"), decoded now; None without one."""
        if self._q is None:
            return None
        h, a, b = self._q
        return str(memoryview(h)[a:b], "utf-8")

    def in_query(self, name):
        """True when the query string holds `name` (bytes), without decoding or copying it."""
        q = self._q
        return q is not None and q[0].find(name, q[1], q[2]) >= 0

    @staticmethod
    async def create(reader, writer, client_addr, buf, srv):
        """The request a _Reader reads into buf (readhead): ValueError for a malformed or oversized head, EOFError."""
        got = await reader.readhead(buf, srv.max_head, srv.max_line)
        if got is None:
            return None
        # Each field is decoded straight out of the buffer, once; the query string stays there until read. No copy of
        # the head or of a line is made: on a fragmented heap the block for it may not be free.
        h, e = got
        mv = memoryview(h)
        nl = b"\r\n" if h.find(b"\r\n", 0, e) >= 0 else b"\n"  # a bare-LF head (hand-written clients)
        j = h.find(nl, 0, e)
        if j > srv.max_line:
            raise ValueError(414)
        a = h.find(b" ", 0, j)
        b = h.rfind(b" ", 0, j)
        if a <= 0 or b <= a + 1 or h.find(b"HTTP/", b + 1, j) != b + 1:
            raise ValueError("bad request line")
        method = str(mv[:a], "utf-8")
        i = h.find(b"?", a + 1, b)
        path = str(mv[a + 1:b if i < 0 else i], "utf-8")
        d = {}
        pos = j + len(nl)
        while True:
            j = h.find(nl, pos, e)
            if j <= pos:  # the blank line that ends the head
                break
            c = h.find(b":", pos, j)
            if c <= pos:
                raise ValueError("bad header line")
            a = c + 1
            while a < j and h[a] == 0x20:
                a += 1
            v = str(mv[a:j], "utf-8")
            if v[-1:] == " ":
                v = v.strip()
            d[str(mv[pos:c], "utf-8").lower()] = v
            pos = j + len(nl)
        req = _Request(client_addr, method, path, (h, i + 1, b) if i >= 0 else None, d, (reader, writer))
        n = req.content_length
        if n < 0:
            raise ValueError("negative Content-Length")
        if n and n <= srv.max_body:
            req.body = await reader.readexactly(n)
        return req


class Response:
    """An answer: status, headers (a plain dict), body (bytes, or a generator of bytes: /metrics)."""
    __slots__ = ("status_code", "headers", "body", "is_head")

    def __init__(self, body=b"", status_code=200, headers=None):
        self.status_code = status_code
        self.is_head = False
        h = dict(headers) if headers else {}
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            h["Content-Type"] = "application/json; charset=UTF-8"
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = h


#: What a handler returns when it has answered on the connection itself (a WebSocket upgrade, a raw 4xx)
HANDLED = Response()


async def _close(writer):
    try:
        await writer.aclose()
    except Exception:
        pass


def _prepend(first, rest):
    yield first
    for x in rest:
        yield x


class Server:
    """The connections: accept (or refuse at the cap), read, hand over to _dispatch(req) → Response (a subclass's),
    write, close. _requests / _refused, when set: counters of answers by status code and of refusals at the cap."""
    #: Connections served at once; more are answered 503 immediately. A Pico W has 5 lwIP TCP sockets in all: one is
    #: the listening socket and one the control-plane client, WebSocket clients count here too.
    max_connections = 3
    #: Largest request body accepted (413 above): the device API takes small JSON commands only.
    max_body = 1024
    #: Longest request line (414 above, docs/device-api.yaml).
    max_line = 2048
    #: Largest request line + headers (431 above): a device JWT is ≈ 250 bytes. The head buffer is this + 4 bytes.
    max_head = 4096
    #: Seconds a client gets to send its request line and headers (a silent client must not hold a socket).
    read_timeout_s = 5
    #: At the connection cap, a new connection takes the place of one that has been sending its head this long.
    evict_after_s = 1
    #: Most bytes of an oversized body read and discarded before the 413 goes out (beyond it the client may see RST).
    max_drain = 16 * 1024
    #: Largest body sent in the same write as the headers (larger ones are not copied for it).
    one_write_max = 1024
    #: Bytes gathered per write of a body made in chunks (/metrics) when the head buffer is taken.
    stream_write = 512
    #: First size of the head buffer of a connection that reads its head while another holds the preallocated one.
    head_block = 512

    def __init__(self):
        self.active = 0
        self.refused = 0
        self.evicted = 0  # slow connections closed (408) to make room for a new one (_evict_idle)
        self.oom = 0  # requests answered 503 because the heap ran out
        self.server = None
        self.port = None
        # allocated once, first (no fragmented heap to find a block in); None while a head or a stream is in it
        self._head = bytearray(self.max_head + 4)  # the head and its blank line
        self._reading = {}  # connection task -> deadline for its head (None once timed out), see _reap
        self._reaper = None
        self._conns = {}  # writers of the connections open now: stop() closes them
        self._requests = None
        self._refused = None
        self._code_keys = {}

    def _oom(self, path):
        # the heap, not the client: what was held is garbage now; collect it so the 503 (retry later) fits
        gc.collect()
        self.oom += 1
        memory_error("request")
        _log.warning("out of memory", path=path)

    def _evict_idle(self):
        """At the cap: cancel the connection that has been sending its head longest, if for over evict_after_s (408);
        True if one was. A few slow clients cannot hold every socket while operators are refused."""
        reading = self._reading
        now = ticks_ms()
        oldest = None
        left = int((self.read_timeout_s - self.evict_after_s) * 1000)  # at most this long before its deadline
        for t in reading:
            d = reading[t]
            if d is not None and ticks_diff(d, now) <= left and (oldest is None or ticks_diff(d, reading[oldest]) < 0):
                oldest = t
        if oldest is None:
            return False
        reading[oldest] = None
        oldest.cancel()
        self.evicted += 1
        return True

    async def _handle(self, reader, writer):
        if self.active >= self.max_connections and not self._evict_idle():
            self.refused += 1
            if self._refused is not None:
                self._refused.inc()
            # read what the client sent: a close on unread data resets the connection and the 503 would be lost
            await self._drain(reader, 2048, 0.1)
            await self._raw_answer(writer, 503, "too many connections", "Retry-After: 1\r\n")
            return
        self.active += 1
        self._conns[writer] = 1
        reader = _Reader(reader)
        task = asyncio.current_task()
        reading = self._reading
        reading[task] = ticks_add(ticks_ms(), int(self.read_timeout_s * 1000))
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        buf = self._head
        self._head = None  # taken: a connection reading its head meanwhile grows one of its own from head_block
        try:
            try:
                req = await _Request.create(reader, writer, writer.get_extra_info("peername"),
                                            buf or bytearray(self.head_block), self)
            except asyncio.CancelledError:
                if reading.get(task, 0) is not None:
                    raise  # cancelled from outside, not by the read timeout (_reap marks its own with None)
                await self._raw_answer(writer, 408, "request not received in time")
                return
            except MemoryError:
                self._oom(None)
                await self._drain(reader, 2048, 0.05)
                await self._raw_answer(writer, 503, "out of memory", "Retry-After: 1\r\n")
                return
            except Exception as e:  # malformed request line/headers, reset: answered 400 below; too large: 414/431
                req = None
                if e.args and e.args[0] in _TOO_LARGE:
                    # answered before the rest is read and dropped: the client reads its 4xx before the close
                    await self._raw_answer(writer, e.args[0], _TOO_LARGE[e.args[0]], drain=reader)
                    return
            finally:
                reading.pop(task, None)
            if req is None:
                await self._drain(reader, 2048, 0.05)
                await self._raw_answer(writer, 400, "malformed request")
                return
            if buf is not None and req._q is None:  # only a query string refers to the buffer: free it now
                self._head, buf = buf, None
            res = await self._dispatch(req)
            res.is_head = req.method == "HEAD"
            if buf is not None:  # answered: its query string is no longer read
                self._head, buf = buf, None
            if self._requests is not None:  # a series key per status code made once, not a kwargs dict per answer
                c = res.status_code
                self._requests.inc_key(self._code_keys.get(c) or self._code_keys.setdefault(c, (str(c),)))
            if req.sock is None:  # detach(): the connection has a new owner, which release()s it
                writer = None
                return
            if req.content_length > self.max_body:  # 413: swallow the body (bounded) so the answer is not lost to RST
                await self._drain(reader, min(req.content_length, self.max_drain), 1)
            if res is not HANDLED:
                await self._write(res, writer)
        except MemoryError:  # building the answer, before its one write: a 503 rather than silence
            self._oom(None)
            await self._raw_answer(writer, 503, "out of memory", "Retry-After: 1\r\n")
        except Exception as e:  # the peer vanished mid-answer (microdot#105) or worse: log, never propagate
            _log.warning("connection failed", error=repr(e))
        finally:
            if buf is not None:
                self._head = buf
            if writer is not None:
                await self.release(writer)

    @staticmethod
    def detach(req):
        """Take the connection from its request for a session that outlives it (a WebSocket): the request becomes
        garbage, the connection keeps its place under max_connections. → (reader, writer); the owner release()s it."""
        s = req.sock
        req.sock = None
        return s

    async def release(self, writer):
        """Close a connection and free its place (once: the end of _handle or of a detached session, or stop())."""
        if self._conns.pop(writer, None) is not None:
            self.active -= 1
        await _close(writer)

    async def _write(self, res, writer):
        # One write for a whole in-memory answer: a write per part costs time and, with Nagle, latency.
        body = res.body
        chunks = not isinstance(body, (bytes, bytearray)) and hasattr(body, "send")  # a generator of bytes (/metrics)
        if not chunks and not isinstance(body, (bytes, bytearray)):
            body = str(body).encode()
        h = res.headers
        extra = ""
        for k, v in h.items():  # an answer has one to three headers
            for x in (v if isinstance(v, list) else (v,)):
                extra += "%s: %s\r\n" % (k, x)
        if not chunks and "Content-Length" not in h:
            extra += "Content-Length: %d\r\n" % len(body)
        if "Content-Type" not in h:
            extra += "Content-Type: text/plain; charset=UTF-8\r\n"
        head = ("HTTP/1.0 %d %s\r\n%s\r\n" % (res.status_code, _REASONS.get(res.status_code, "N/A"), extra)).encode()
        try:
            if res.is_head:
                await writer.awrite(head)
            elif chunks:  # no Content-Length: the answer is HTTP/1.0 and closing the connection ends the body
                await self._stream_body(writer, head, body)
            elif len(body) > self.one_write_max:  # no copy of a large body just to save one write
                await writer.awrite(head)
                await writer.awrite(body)
            else:
                await writer.awrite(head + body)
        except OSError:  # the peer is gone (reset, broken pipe): nothing left to tell it
            pass

    async def _stream_body(self, writer, head, chunks):
        # Gathered in the head buffer (while a head is read into it, one of stream_write bytes), written when full: no
        # write per chunk (Nagle) and no block asked of the heap, as a bytes object grown chunk by chunk would.
        wb = own = self._head
        self._head = None
        if wb is None:
            wb = bytearray(self.stream_write)
        mv = memoryview(wb)
        size = len(wb)
        n = 0
        try:
            for chunk in _prepend(head, chunks):
                cv = memoryview(chunk)
                off = 0
                while off < len(cv):
                    k = min(len(cv) - off, size - n)
                    mv[n:n + k] = cv[off:off + k]
                    n += k
                    off += k
                    if n == size:
                        await writer.awrite(wb)
                        n = 0
            if n:
                await writer.awrite(mv[:n])
        finally:
            if own is not None:
                self._head = own

    async def _drain(self, reader, limit, timeout_s):
        try:
            while limit > 0:
                chunk = await asyncio.wait_for(reader.read(min(limit, 512)), timeout_s)
                if not chunk:
                    return
                limit -= len(chunk)
        except Exception:
            pass

    async def _raw_answer(self, writer, status, msg, extra="", version="1.0", drain=None):
        """A JSON error answer, then the connection closed; drain: a reader whose unread request (up to max_drain
        bytes) is swallowed after the answer, so the close does not reset the connection under it."""
        body = json.dumps({"error": msg})
        try:
            await writer.awrite(("HTTP/%s %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                                 % (version, status, _REASONS.get(status, "Error"), len(body), extra, body)).encode())
            if drain is not None:
                await self._drain(drain, self.max_drain, 0.2)
        except Exception:
            pass
        await _close(writer)

    async def start(self, host="0.0.0.0", port=80):
        """Listen on host:port (OSError if taken) and return; connections are served by the event loop."""
        async def serve(reader, writer):
            await self._handle(reader, stream_writer(writer))
        self.server = await asyncio.start_server(serve, host, port)
        self.port = port
        return self.server

    async def _reap(self):
        # Every connection's read timeout in one task (a wait_for per request is a task and garbage): one still sending
        # its head read_timeout_s after it was accepted is cancelled (408).
        reading = self._reading
        while True:
            await asyncio.sleep(min(0.5, self.read_timeout_s / 4))
            now = ticks_ms()
            for t in [t for t in reading if reading[t] is not None and ticks_diff(now, reading[t]) >= 0]:
                reading[t] = None
                t.cancel()

    async def stop(self):
        """Stop listening and close every connection still open, detached sessions too."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self.server is not None:
            self.server.close()
            try:
                await self.server.wait_closed()
            except Exception:
                pass
            self.server = None
        for t in list(self._reading):  # still reading their heads
            t.cancel()
        for w in list(self._conns):
            await self.release(w)
