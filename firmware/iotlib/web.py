# The device's web layer: a small HTTP/1.0 server on asyncio streams, with microdot's handler conventions (a handler
# returns a body, (body, status), (body, status, headers) or a status) but none of its code on the device: the parse,
# the route lookup and the answer are the device's own, and microdot's other features (regex routes, hooks, sub-apps,
# cookies, forms, files) would only cost heap and interned names (11.4K and 111 names on a 32-bit build: the difference
# between fitting a stock Pico W's 192K heap and not; docs/benchmarks.md). Every route declares the least role it
# needs; before the handler runs, the caller is authenticated (Bearer device JWT or static token → 401 / 403) and rate limited (token bucket per
# authenticated caller, else per client address → 429 + Retry-After). Every error answer is JSON {"error": …} (404,
# 405, 413, 414, 431, 400 bad JSON, 500 too). A connection cap answers 503 at once instead of queueing (a Pico W has 5
# TCP sockets in all) unless a connection slow to send its request can make room, a request that does not arrive in
# time is dropped, and nothing a client does — garbage, a reset mid-request (microdot#105), a crashing
# handler — stops the server. Handlers are coroutines and never block the loop (microdot#134).
import gc
import json
from iotlib.compat import asyncio, ticks_ms, ticks_diff, ticks_add, format_exc
from iotlib import log as _logmod


_log = _logmod.get("web")

ROLES = ("viewer", "operator", "admin")
_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 414: "URI Too Long", 429: "Too Many Requests", 500: "Internal Server Error",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


_NO_ARGS = {}  # url_args of a fixed-path route (never written to)


class BadRequest(Exception):
    pass


#: a request head beyond the documented limits: ValueError(414) for the request line, ValueError(431) for the head
_TOO_LARGE = {414: "URI too long", 431: "request headers too large"}


def error(status, message, headers=None):
    """A JSON error answer for a handler to return."""
    return {"error": message}, status, headers or {}


def json_body(req, required=True):
    """The request body parsed as a JSON object; BadRequest (→ 400) for an empty body when required, invalid JSON or a
    non-object."""
    body = req.body
    if not body:
        if required:
            raise BadRequest("request body must be a JSON object")
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeError):
        raise BadRequest("request body is not valid JSON")
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def client_ip(addr):
    """The client's address as text, a rate-limit key: (ip, port) on lwIP/CPython, a raw sockaddr on the unix port.
    Always a str: the limiter's table also holds callers' `sub`s, and a bytes key beside str keys makes the unix port
    warn "Comparison between bytes and str" on every colliding lookup."""
    if isinstance(addr, (tuple, list)) and addr:
        return addr[0]
    if isinstance(addr, (bytes, bytearray)) and len(addr) >= 8:
        return "%d.%d.%d.%d" % (addr[4], addr[5], addr[6], addr[7])  # sockaddr_in: family(2) port(2) address(4)
    return addr if isinstance(addr, str) else "?"


def bearer_from(req):
    """The token of a request: Authorization: Bearer …, else ?token= (clients that cannot set headers), else a
    Sec-WebSocket-Protocol entry "bearer.<token>" (browsers' WebSocket API can set nothing else)."""
    h = req.headers.get("Authorization")
    if h:
        return h
    t = req.args.get("token") if req.in_query(b"token=") else None
    if t:
        return t
    for p in (req.headers.get("Sec-WebSocket-Protocol") or "").split(","):
        p = p.strip()
        if p.startswith("bearer."):
            return p[7:]
    return None


class _BufferedReader:
    """A connection's reader that reads in blocks. MicroPython's socket readline reads one byte per call (on the unix port one system call per byte): a request carrying a
    ~250-byte bearer token cost more than the rest of the request together. readhead() hands out the whole head at
    once (_Request parses it in one pass); readexactly()/read() serve the body and a WebSocket's frames from the same
    buffer."""
    __slots__ = ("_r", "_buf", "_pos")
    #: bytes asked of the socket at a time
    block = 512

    def __init__(self, reader):
        self._r = reader
        self._buf = b""
        self._pos = 0  # what is before it was handed out: lines are sliced from the buffer, the rest is not copied

    def _take(self, end):
        buf = self._buf
        out = buf if self._pos == 0 and end == len(buf) else buf[self._pos:end]  # all of it: no copy
        if end >= len(buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        return out

    async def _fill(self):
        chunk = await self._r.read(self.block)
        if not chunk:
            return False
        if self._pos:
            self._buf = self._buf[self._pos:] + chunk
            self._pos = 0
        else:
            self._buf = self._buf + chunk if self._buf else chunk
        return True

    async def readhead(self, limit):
        """The request line and headers with the blank line that ends them: b"" for a connection closed before
        anything came, ValueError(414/431) above the limits, EOFError when the connection closed mid-head. A head that
        ends with a bare LF (some hand-written clients) is taken too. A head that spans several reads is kept as its
        blocks and joined once, when its end is found within the limit: the buffer is not regrown block by block (a
        4K block asked for at each step can fail on a fragmented heap, and a head over the limit is refused without
        ever being held in one piece)."""
        parts = None    # the head's blocks so far, when it spans several reads
        size = 0        # bytes in parts
        tail = b""      # the head's last 3 bytes so far: its end may straddle two reads
        nl = -1         # where the request line ends in the head, -1 while unseen
        while True:
            buf = self._buf
            pos = self._pos
            if pos < len(buf):
                seg = tail + buf[pos:] if tail else (buf if pos == 0 else buf[pos:])
                off = size - len(tail)  # where seg starts in the head
                i = seg.find(b"\r\n\r\n")
                n = 4
                j = seg.find(b"\n\n")
                if i < 0 or 0 <= j < i:
                    i, n = j, 2
                if nl < 0:
                    k = seg.find(b"\n")
                    if k >= 0:
                        nl = off + k
                end = off + i + n if i >= 0 else -1  # the head's length with its blank line, -1 while unseen
                if (end - n if end >= 0 else off + len(seg)) > limit:
                    raise ValueError(414 if nl < 0 or nl > DeviceWeb.max_line + 1 else 431)
                if nl < 0 and off + len(seg) > DeviceWeb.max_line + 1:
                    raise ValueError(414)  # refused as soon as the request line is too long, not at the head's limit
                if end >= 0:
                    last = self._take(pos + end - size)
                    if parts is None:
                        return last
                    parts.append(last)
                    return b"".join(parts)
                piece = self._take(len(buf))
                if parts is None:
                    parts = []
                parts.append(piece)
                size += len(piece)
                tail = (tail + piece)[-3:]
            if not await self._fill():
                if size:
                    raise EOFError("connection closed mid-request")
                return b""

    async def readexactly(self, n):
        while len(self._buf) - self._pos < n:
            if not await self._fill():
                raise EOFError("connection closed")
        return self._take(self._pos + n)

    async def read(self, n=-1):
        if self._pos >= len(self._buf):
            return await self._r.read(n)
        if n < 0:
            return self._take(len(self._buf))
        return self._take(min(len(self._buf), self._pos + n))


class _Headers:
    """A request's headers, names lower-cased once as they are parsed; lookups take any case (a lower-case name costs
    no copy), without a second dict of names per request."""
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

    def __iter__(self):
        return iter(self._d)

    def items(self):
        return self._d.items()


class _Request:
    """A request, made in one pass over its head (create). What a device request does not use stays a class default:
    the per-request garbage is what sets how often the collector has to scan the whole heap (docs/benchmarks.md,
    Device API)."""
    _q = None  # (head bytes, start, end) of the query string, never decoded unless read; None without one
    _args = None
    content_length = 0
    content_type = None
    _body = b""
    _stream = None
    claims = None  # the caller's token claims, set by DeviceWeb.check
    url_args = _NO_ARGS

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
        t = headers.get("content-type")
        if t is not None:
            self.content_type = t

    @property
    def g(self):
        # microdot's per-request namespace: handlers read req.g.claims; the request itself holds them (no object more)
        return self

    @property
    def body(self):
        return self._body

    @property
    def url(self):
        return self.path if self._q is None else self.path + "?" + self._query()

    def _query(self):
        h, a, b = self._q
        return str(memoryview(h)[a:b], "utf-8")

    def in_query(self, name):
        """True when the query string holds `name` (bytes), without decoding or copying it."""
        q = self._q
        return q is not None and q[0].find(name, q[1], q[2]) >= 0

    @property
    def args(self):
        # Parsed when a handler asks (no device route but a WebSocket's ?token= reads it): a long query string is
        # never decoded nor copied for a route that does not read it.
        a = self._args
        if a is None:
            a = self._args = _parse_query(self._query()) if self._q is not None else _NO_ARGS
        return a

    @staticmethod
    async def create(reader, writer, client_addr):
        """The request on a _BufferedReader: ValueError for a malformed or oversized head, EOFError for a connection
        closed before the head ended, None for one closed before it sent anything."""
        h = await reader.readhead(DeviceWeb.max_head)
        if not h:
            return None
        # Each field is decoded straight out of the head's bytes, once (no decoded copy of the whole head, no list of
        # lines, no copy of a line before its value): what is held at once sets the longest request line a
        # fragmented heap can take (a 1,200-character query ran a sensors device at its documented heap out of
        # memory): the path is the line's only copy, the query string stays in the head's bytes until read.
        mv = memoryview(h)
        nl = b"\r\n" if b"\r\n" in h else b"\n"  # a bare-LF head (hand-written clients)
        k = len(nl)
        j = h.find(nl)
        if j > DeviceWeb.max_line:  # the request line's limit (docs/device-api.yaml)
            raise ValueError(414)
        a = h.find(b" ", 0, j)
        b = h.rfind(b" ", 0, j)
        if a <= 0 or b <= a + 1 or h[b + 1:b + 6] != b"HTTP/":
            raise ValueError("bad request line")
        method = str(mv[:a], "utf-8")
        i = h.find(b"?", a + 1, b)
        path = str(mv[a + 1:b if i < 0 else i], "utf-8")
        query = (h, i + 1, b) if i >= 0 else None
        d = {}
        pos = j + k
        while True:
            j = h.find(nl, pos)
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
            pos = j + k
        req = _Request(client_addr, method, path, query, d, (reader, writer))
        n = req.content_length
        if n < 0:
            raise ValueError("negative Content-Length")
        if n and n <= DeviceWeb.max_body:
            req._body = await reader.readexactly(n)
        elif n:
            req._stream = reader
        return req


class _Response:
    """An answer: status, headers in a plain dict (names as the handler wrote them; DeviceWeb._write only iterates
    them) and a body of bytes or a generator of bytes (/metrics)."""
    __slots__ = ("status_code", "headers", "body", "is_head")

    def __init__(self, body=b"", status_code=200, headers=None):
        self.status_code = status_code
        self.is_head = False
        h = {}
        if headers:
            h.update(headers)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            h["Content-Type"] = "application/json; charset=UTF-8"
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = h


#: What a handler returns when it has answered on the connection itself (a WebSocket upgrade, a raw 4xx)
HANDLED = _Response()


def _unquote(s):
    # %XX and + of a query string (the device reads ?token= only); a malformed escape is kept as it is
    if "%" not in s and "+" not in s:
        return s
    parts = s.replace("+", " ").encode().split(b"%")
    out = bytearray(parts[0])
    for p in parts[1:]:
        try:
            out.append(int(p[:2], 16))
            out += p[2:]
        except ValueError:
            out += b"%" + p
    return out.decode()


def _parse_query(q):
    d = {}
    for pair in q.split("&"):
        if pair:
            k, _, v = pair.partition("=")
            d[_unquote(k)] = _unquote(v)
    return d


def _answer(res):
    """A handler's result as a _Response, by microdot's rules: a body, (body, status), (body, status, headers),
    (body, headers), a bare status, or a _Response."""
    if isinstance(res, _Response):
        return res
    if res is None:
        return _Response()
    if isinstance(res, int):
        return _Response(b"", res)
    if isinstance(res, tuple):
        if isinstance(res[0], int):
            return _Response(b"", res[0], res[1] if len(res) > 1 else None)
        if len(res) > 1 and not isinstance(res[1], int):
            return _Response(res[0], 200, res[1])
        return _Response(res[0], res[1] if len(res) > 1 else 200, res[2] if len(res) > 2 else None)
    return _Response(res)


def _match(segs, path):
    """The url args of path under a route's segments ((literal, None) or (None, name) pairs), or None. No regex
    (MicroPython's recurses per character), and a path with the wrong number of segments is not even split."""
    if path.count("/") != len(segs) - 1:
        return None
    args = {}
    i = 0
    for p in path.split("/"):
        lit, name = segs[i]
        i += 1
        if lit is None and p:
            args[name] = p
        elif p != lit:
            return None
    return args


def _prepend(first, rest):
    yield first
    for x in rest:
        yield x


class DeviceWeb:
    #: Connections served at once; more are answered 503 immediately. A Pico W has 5 lwIP TCP sockets in all: one is
    #: the listening socket and one the control-plane client, WebSocket clients count here too.
    max_connections = 3
    #: Largest request body accepted (413 above): the device API takes small JSON commands only.
    max_body = 1024
    #: Longest request line (414 above, docs/device-api.yaml).
    max_line = 2048
    #: Largest request line + headers (431 above): a device JWT is ≈ 250 bytes.
    max_head = 4096
    #: Seconds a client gets to send its request line and headers (a silent client must not hold a socket).
    read_timeout_s = 5
    #: At the connection cap, a new connection takes the place of one that has been sending its head this long.
    evict_after_s = 1
    #: Most bytes of an oversized body read and discarded before the 413 goes out (beyond it the client may see RST).
    max_drain = 16 * 1024
    #: Largest body sent in the same write as the headers (larger ones are not copied for it).
    one_write_max = 1024
    #: Bytes gathered per write of a body made in chunks (/metrics): the answer never needs one large block.
    stream_write = 512
    #: Per-client token bucket defaults (requests/s sustained, burst); hot-reloadable through configure().
    rate_per_s = 10
    burst = 20

    def __init__(self, verify, info=None, ready=None, on_reboot=None, metrics=None):
        """verify(bearer) → claims with a "role", raising on a bad token (iotlib.auth.AuthManager.verify).
        info() → dict for /info; ready() → (bool, dict) for /ready; on_reboot(): called shortly after POST /reboot
        answered. metrics: an iotlib.metrics registry for /metrics (None: the module's REGISTRY)."""
        self._verify = verify
        self._info = info
        self._ready = ready
        self._on_reboot = on_reboot
        self._registry = metrics
        self.active = 0
        self.refused = 0
        self.evicted = 0  # slow connections closed (408) to make room for a new one (_evict_idle)
        self.oom = 0  # requests answered 503 because the heap ran out while reading them
        self.started_ms = ticks_ms()
        self.server = None
        self._limiter = None
        self._wbuf = None  # the streamed answers' write buffer, kept between answers (_stream_body)
        self._reading = {}  # connection task -> deadline for its request (None once timed out), see _reap
        self._reaper = None
        self._exact = {}  # path without <args> -> {method: handler}, filled by route()
        self._patterns = []  # [(segments, {method: handler})] for paths with <args>, filled by route()
        self._requests = None
        self._code_keys = {}
        if metrics is not False:
            self._setup_metrics()
        self.route("/health", None, self._health)
        self.route("/ready", None, self._ready_h)
        self.route("/metrics", "viewer", self._metrics_h)
        self.route("/info", "viewer", self._info_h)
        self.route("/reboot", "admin", self._reboot_h, methods=["POST"])

    # --- configuration ---------------------------------------------------------------------------------------------
    def configure(self, api=None):
        """Apply an "api" config section: {"rate_per_s", "burst"} (static tokens are the verifier's business)."""
        api = api or {}
        rate = api.get("rate_per_s", self.rate_per_s)
        burst = api.get("burst", self.burst)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError("api.rate_per_s: must be a number > 0")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ValueError("api.burst: must be an integer >= 1")
        from iotlib.auth import RateLimiter
        self._limiter = RateLimiter(rate, burst)

    def _setup_metrics(self):
        from iotlib import metrics as m
        reg = self._registry or m.REGISTRY
        self._requests = reg.counter("iotlib_http_requests_total", "Device API answers by status code.", ("code",))
        self._refused = reg.counter("iotlib_http_refused_connections_total",
                                    "Connections answered 503 at the connection cap.")
        reg.gauge_fn("iotlib_http_connections", "Device API connections open now.", lambda: self.active)

    # --- routing with auth -----------------------------------------------------------------------------------------
    def route(self, path, role, handler, methods=None):
        """Register coroutine handler(req, **url_args) at path, callable by role or above (None: public, still rate
        limited; False: the handler checks for itself with check())."""
        web = self

        async def guarded(req, **kw):
            denied = web.check(req, role) if role is not False else None
            if denied is not None:
                return _answer(denied)
            try:
                return _answer(await handler(req, **kw))
            except BadRequest as e:
                return _answer(error(400, str(e)))
        methods = methods or ["GET"]
        if "<" in path:
            # "<name>": one non-empty segment, passed as a string (the device's routes need no more)
            key = tuple((None, p[1:-1]) if p[:1] == "<" else (p, None) for p in path.split("/"))
            for k, by_method in self._patterns:
                if k == key:
                    break
            else:
                by_method = {}
                self._patterns.append((key, by_method))
        else:
            by_method = self._exact.setdefault(path, {})
        for m in methods:
            by_method[m] = guarded
        return guarded

    def check(self, req, role):
        """None when req may go ahead for role, else the error answer (429, 401, 403). Sets req.g.claims.

        Rate limits: a caller with a valid token has a bucket of its own (its `sub`); everything else — public routes,
        no token, a bad token — shares its address's bucket. Anonymous calls (/health probes, a scanner) cannot use up
        an operator's requests from the same address, and a flood of bad tokens is still throttled."""
        if self._limiter is None:
            self.configure()
        req.g.claims = None
        if role is None:
            return self._limit(client_ip(req.client_addr))
        bearer = bearer_from(req)
        if not bearer:
            return self._limit(client_ip(req.client_addr)) or error(401, "missing token", {"WWW-Authenticate": "Bearer"})
        try:
            claims = self._verify(bearer)
        except Exception as e:  # AuthError, or anything else a verifier raises: never a 500
            return self._limit(client_ip(req.client_addr)) or error(401, "invalid token: %s" % e,
                                                                     {"WWW-Authenticate": "Bearer"})
        denied = self._limit(claims.get("sub") or "?")
        if denied is not None:
            return denied
        have = claims.get("role")
        if have not in ROLES or ROLES.index(have) < ROLES.index(role):
            return error(403, "role %s required" % role)
        req.g.claims = claims
        return None

    def _limit(self, key):
        ok, wait = self._limiter.allow(key)
        return None if ok else error(429, "rate limit exceeded", {"Retry-After": str(max(1, wait))})

    def _find(self, req):
        """The handler of req's route, or 404/405. A fixed path is one dict lookup, a path with <args> is matched
        segment by segment (_match): no regex (MicroPython's recurses per character: a 1,000-character path under
        /gpio/<relay> ended in "maximum recursion depth exceeded" and no answer)."""
        path = req.path
        f = self._exact.get(path)
        if f is None:
            for segs, by in self._patterns:
                args = _match(segs, path)
                if args is not None:
                    req.url_args = args
                    f = by
                    break
        if f is None:
            return 404
        m = req.method
        h = f.get("GET" if m == "HEAD" else m)  # (no OPTIONS: no browser calls the device cross-origin)
        if h is None:
            # the 405 names the path's methods (RFC 9110 requires Allow)
            req.allow = ", ".join(("HEAD",) + tuple(f) if "GET" in f else f)
            return 405
        return h

    def _oom(self):
        from iotlib import metrics
        self.oom += 1
        metrics.memory_error("request")

    async def _dispatch(self, req):
        if req.content_length > self.max_body:
            return _answer(error(413, "request body too large (max %d bytes)" % self.max_body))
        f = self._find(req)
        if f == 404:
            return _answer(error(404, "not found"))
        if f == 405:
            return _answer(error(405, "method not allowed", {"Allow": req.allow}))
        try:
            res = await f(req, **req.url_args)
        except MemoryError:
            # the heap, not the request: what the handler held is garbage now; a retry can succeed
            gc.collect()
            self._oom()
            _log.warning("out of memory", path=req.path[:64])
            return _answer(error(503, "out of memory", {"Retry-After": "1"}))
        except Exception as e:
            _log.error("handler failed", path=req.path, error=repr(e))
            return _answer(error(500, "internal server error"))
        res.is_head = req.method == "HEAD"
        return res

    # --- connection handling -----------------------------------------------------------------------------------------
    def _evict_idle(self):
        """At the connection cap: cancel the connection that has been sending its request line and headers longest,
        if for more than evict_after_s (it answers 408 and closes). True if one was. A few slow clients then cannot
        hold every socket for read_timeout_s at a time while operators are refused."""
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
            if self._requests is not None:
                self._refused.inc()
            # Read what the client already sent: closing on unread data would reset the connection (RST) and the
            # client would never see the 503.
            await self._drain(reader, 2048, 0.1)
            await self._raw_answer(writer, 503, "too many connections", "Retry-After: 1\r\n")
            return
        self.active += 1
        reader = _BufferedReader(reader)
        task = asyncio.current_task()
        reading = self._reading
        reading[task] = ticks_add(ticks_ms(), int(self.read_timeout_s * 1000))
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        try:
            try:
                req = await _Request.create(reader, writer, writer.get_extra_info("peername"))
            except asyncio.CancelledError:
                if reading.get(task, 0) is not None:
                    raise  # cancelled from outside, not by the read timeout (_reap marks its own with None)
                await self._raw_answer(writer, 408, "request not received in time")
                return
            except MemoryError:
                # The heap, not the client: answering 400 would tell it to give up. What the parse held is garbage
                # now; collect it so the answer itself fits, and ask for a retry (as the connection cap does).
                gc.collect()
                self._oom()
                _log.warning("out of memory reading a request")
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
            res = await self._dispatch(req)
            if self._requests is not None:
                code = res.status_code
                key = self._code_keys.get(code)
                if key is None:  # a series key per status code, made once (not a kwargs dict and a tuple per answer)
                    key = self._code_keys[code] = (str(code),)
                self._requests.inc_key(key)
            if req.sock is None:  # detach(): the connection has a new owner, which release()s it
                writer = None
                return
            if req.content_length > self.max_body:  # 413: swallow the body (bounded) so the answer is not lost to RST
                await self._drain(reader, min(req.content_length, self.max_drain), 1)
            if res is not HANDLED:
                await self._write(res, writer)
        except Exception as e:  # the peer vanished mid-answer (microdot#105) or worse: log, never propagate
            _log.warning("connection failed", error=repr(e))
        finally:
            if writer is not None:
                await self.release(writer)

    @staticmethod
    def detach(req):
        """Take the connection away from its request: once the handler returns, the request, its headers and the
        frames that served it are garbage, but the connection stays open and keeps its place under
        max_connections. For a session that outlives its request by minutes (a WebSocket: ≈ 2.5K less per client
        on the unix port). Returns (reader, writer); the new owner calls release(writer) when done."""
        s = req.sock
        req.sock = None
        return s

    async def release(self, writer):
        """Close a connection and free its place (the end of _handle, or of a detached session)."""
        self.active -= 1
        try:
            await writer.aclose()
        except Exception:
            pass

    async def _write(self, res, writer):
        # One write for a whole in-memory answer (microdot's Response.write sends the status line, every header, the
        # blank line and the body as separate writes: on the unix port that was most of a request's cost and, with
        # Nagle on the small trailing segments, much of its latency).
        body = res.body
        chunks = not isinstance(body, (bytes, bytearray)) and hasattr(body, "send")  # a generator of bytes (/metrics)
        if not chunks and not isinstance(body, (bytes, bytearray)):
            body = str(body).encode()
        h = res.headers
        extra = ""
        for k, v in h.items():  # an answer has one to three headers
            if isinstance(v, list):
                for x in v:
                    extra += "%s: %s\r\n" % (k, x)
            else:
                extra += "%s: %s\r\n" % (k, v)
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
        except OSError:  # the peer is gone (reset, broken pipe): nothing left to tell it; microdot mutes these too
            pass

    async def _stream_body(self, writer, head, chunks):
        # Sent in writes of stream_write bytes (not one per chunk: Nagle) gathered in one buffer that stays allocated
        # between answers: growing a bytes object chunk by chunk (`buf += chunk`) asked a fragmented heap for ever
        # larger blocks — the 693-byte one was where the sensors device failed its /metrics below 216K (ROMFS).
        wb = self._wbuf
        self._wbuf = None  # two answers at once: the second gets its own
        if wb is None or len(wb) != self.stream_write:
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
            self._wbuf = wb

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
        try:
            await writer.aclose()
        except Exception:
            pass

    async def start(self, host="0.0.0.0", port=80):
        """Listen on host:port (OSError if taken) and return; connections are served by the event loop."""
        async def serve(reader, writer):
            if not hasattr(writer, "awrite"):  # CPython streams: add MicroPython's awrite/aclose
                from types import MethodType

                async def awrite(self, data):
                    self.write(data if isinstance(data, bytes) else bytes(data))  # the buffer is reused: copy
                    await self.drain()

                async def aclose(self):
                    self.close()
                    await self.wait_closed()
                writer.awrite = MethodType(awrite, writer)
                writer.aclose = MethodType(aclose, writer)
            await self._handle(reader, writer)
        self.server = await asyncio.start_server(serve, host, port)
        self.port = port
        return self.server

    async def _reap(self):
        # The read timeout of every connection in one task (not a wait_for around each request's parse: that was a
        # task and ≈ 0.9K of garbage per request): one still sending its request line and headers read_timeout_s
        # after it was accepted is cancelled, and answers 408.
        reading = self._reading
        while True:
            await asyncio.sleep(min(0.5, self.read_timeout_s / 4))
            now = ticks_ms()
            for t in [t for t in reading if reading[t] is not None and ticks_diff(now, reading[t]) >= 0]:
                reading[t] = None
                t.cancel()

    async def stop(self):
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

    # --- built-in routes ---------------------------------------------------------------------------------------------
    def uptime_s(self):
        return ticks_diff(ticks_ms(), self.started_ms) // 1000

    async def _health(self, req):
        return {"status": "ok", "uptime_s": self.uptime_s()}

    async def _ready_h(self, req):
        ok, detail = self._ready() if self._ready else (True, {})
        detail = dict(detail)
        detail["ready"] = ok
        return detail, 200 if ok else 503

    async def _metrics_h(self, req):
        from iotlib import metrics as m
        reg = self._registry or m.REGISTRY
        return reg.render_chunks(), 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}

    async def _info_h(self, req):
        return self._info() if self._info else {}

    async def _reboot_h(self, req):
        if self._on_reboot is None:
            return error(503, "reboot not available")
        _log.warning("reboot requested", by=(req.g.claims or {}).get("sub"))
        asyncio.create_task(self._reboot_later())
        return {"rebooting": True}, 202

    async def _reboot_later(self):
        await asyncio.sleep(0.2)  # let the 202 reach the client first
        try:
            r = self._on_reboot()
            if hasattr(r, "send"):
                await r
        except Exception as e:  # SystemExit (a simulated reset) is not an Exception: it goes through
            _log.error("reboot failed", error=format_exc(e))
