# A small async HTTP/1.1 client on asyncio streams for the device's calls to the control plane.
# One request at a time over one connection (Connection: close): a Pico W has 5 TCP sockets in all and cannot afford
# two TLS sessions. Every transport failure comes out as HTTPError, so callers handle exactly one exception type.
import json as _json

from iotlib.compat import asyncio, const

_CRLF = b"\r\n"
_CHUNK = const(512)
_ECONNREFUSED = const(111)
_MBEDTLS_ERR = const(-0x1000)  # mbedtls error codes are below this


class HTTPError(Exception):
    """The request did not produce a complete, well-formed HTTP response. str(e) is the reason."""


class Yielded(HTTPError):
    """A yieldable request (a long-poll) gave the connection up to another request: ask again, nothing was lost."""


class Response:
    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # lower-case names
        self.body = body

    def json(self):
        try:
            return _json.loads(self.body)
        except (ValueError, TypeError):
            raise HTTPError("response body is not JSON")

    def __repr__(self):
        return "<Response %d %d bytes>" % (self.status, len(self.body))


def parse_url(url):
    """(scheme, host, port, path) of an http/https URL; HTTPError if it is not one."""
    if url.startswith("https://"):
        scheme, rest, port = "https", url[8:], 443
    elif url.startswith("http://"):
        scheme, rest, port = "http", url[7:], 80
    else:
        raise HTTPError("unsupported URL: %s" % url)
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    host = hostport
    if ":" in hostport:
        host, p = hostport.rsplit(":", 1)
        try:
            port = int(p)
        except ValueError:
            raise HTTPError("bad port in URL: %s" % url)
    if not host or not 0 < port < 65536:
        raise HTTPError("bad host or port in URL: %s" % url)
    return scheme, host, port, path


def pem_to_der(pem):
    """The first certificate of a PEM text as DER (the unix port's TLS takes DER cadata only)."""
    import binascii
    if isinstance(pem, str):
        pem = pem.encode()
    begin = pem.find(b"-----BEGIN CERTIFICATE-----")
    end = pem.find(b"-----END CERTIFICATE-----")
    if begin < 0 or end < begin:
        raise ValueError("no PEM certificate")
    return binascii.a2b_base64(b"".join(pem[begin + 27:end].split()))


def _tls_context(cadata):
    import ssl
    if cadata is not None and (isinstance(cadata, str) or cadata[:5] == b"-----"):
        cadata = pem_to_der(cadata)
    if hasattr(ssl, "create_default_context"):  # CPython
        return ssl.create_default_context(cadata=cadata) if cadata is not None else ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # set explicitly: MicroPython's client context does not verify unless told to
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cadata is not None:
        ctx.load_verify_locations(cadata=cadata)
    return ctx


class HTTPClient:
    """`await HTTPClient().request("GET", url)` → Response. Serialises requests (one connection at a time)."""

    #: ms allowed for TCP connect (+ DNS, which is blocking on MicroPython)
    connect_timeout_ms = 5000
    #: ms allowed for sending the request and reading the whole response (long-polls pass their own)
    timeout_ms = 10000
    #: largest response body accepted; the control plane's documents are ≤ 8 KiB, so this is generous
    max_body = 16 * 1024
    #: bytes of status line + headers accepted
    max_header_bytes = 4096
    #: header lines accepted
    max_headers = 32
    #: bytes held in one piece for the TLS session when the client has a CA (https): mbedTLS allocates its 16K+ record
    #: buffer in one block, and once a device has run a while its free heap is many small holes. The block is freed
    #: just before the handshake and taken again after the exchange (see _hold).
    tls_reserve = 24 * 1024
    #: the smallest reserve worth keeping (bytes): mbedTLS allocates its 16K + 4K record buffers (and headers) when the
    #: socket is wrapped; with a 20K block and the small holes around it a session ran (docs/hardware.md §7)
    tls_reserve_min = 20 * 1024
    #: bytes of the reserve held now by the device's client (the iotlib_tls_reserve_bytes gauge)
    held = 0

    def __init__(self, timeout_ms=None, cadata=None, connect_timeout_ms=None, max_body=None, user_agent="iotlib"):
        if timeout_ms is not None:
            self.timeout_ms = timeout_ms
        if connect_timeout_ms is not None:
            self.connect_timeout_ms = connect_timeout_ms
        if max_body is not None:
            self.max_body = max_body
        self.cadata = cadata
        self.user_agent = user_agent
        #: on_io(ok): whether the link carried the connect (a refusal is an answer too); None: nobody listens
        self.on_io = None
        #: link_check(): raises OSError when the link cannot carry traffic (hal.link_check: the simulated board's
        #: silent link death; nothing on a board). None: not checked
        self.link_check = None
        self._ctx = None
        self._lock = None
        self._poll = None     # the task whose yieldable request holds the connection
        self._yield = False   # another request asked it to give the connection up
        self._waiting = 0     # requests waiting for the connection
        self.requests = 0
        self.failures = 0
        self.yields = 0
        #: the block held for the next TLS handshake (None: not held; see tls_reserve)
        self.reserve = None
        if cadata is not None:
            self._hold(True)

    def _hold(self, top=False):
        # top (at boot, the free heap still one piece): a filler takes the bottom of the largest free block so the
        # reserve sits at its top end. The GC allocates first-fit from the bottom of the heap, so what the device
        # allocates later goes below it, and what a session leaves alive lands above its buffers, not in the middle
        # of the gap. After an exchange the gap is free again, less what landed at its end: settle for less, down to
        # what a session needs. A failed allocation collects first, so no explicit gc here.
        n = self.tls_reserve
        filler = None
        if top:
            from iotlib.metrics import largest_free_block
            f = (largest_free_block() or 0) - n - 512
            try:
                filler = bytearray(f) if f > 0 else None
            except MemoryError:
                pass
        while n >= self.tls_reserve_min:
            try:
                self.reserve = bytearray(n)
                HTTPClient.held = n
                return
            except MemoryError:
                n -= 512
            finally:
                filler = None
        self.reserve = None
        HTTPClient.held = 0

    def _tls(self):
        if self._ctx is None:
            try:
                self._ctx = _tls_context(self.cadata)
            except (ValueError, OSError, ImportError) as e:  # ImportError: a firmware built without ssl
                raise HTTPError("TLS setup failed: %s" % (e,))
        return self._ctx

    async def request(self, method, url, json=None, headers=None, body=None, timeout_ms=None, yieldable=False):
        """yieldable: a long-poll; any other request arriving meanwhile takes the connection over at once (the
        long-poll raises Yielded), so one connection serves both without a report waiting out a poll."""
        scheme, host, port, path = parse_url(url)
        if json is not None:
            body = _json.dumps(json)
        if isinstance(body, str):
            body = body.encode()
        hostport = host if port in (80, 443) else "%s:%d" % (host, port)
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: " + hostport, "Connection: close", "User-Agent: " + self.user_agent]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: %d" % (len(body) if body else 0))
        if json is not None:
            lines.append("Content-Type: application/json")
        if headers:
            for k in headers:
                lines.append("%s: %s" % (k, headers[k]))
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._poll is not None and not self._yield:
            self._yield = True
            self.yields += 1
            self._poll.cancel()  # delivered at the long-poll's next await, which is inside _exchange
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            if yieldable:
                if self._waiting:  # queued before the poll got the connection: it goes first
                    raise Yielded("another request is waiting for the connection")
                self._poll = asyncio.current_task()
            self.requests += 1
            r = await self._exchange(scheme, host, port, head, body, method,
                                     self.timeout_ms if timeout_ms is None else timeout_ms)
        except HTTPError as e:
            if not isinstance(e, Yielded):
                self.failures += 1
            raise
        except asyncio.CancelledError:
            if not (yieldable and self._yield):
                raise
            t = asyncio.current_task()
            if hasattr(t, "uncancel"):  # CPython counts cancellations; this one is handled
                t.uncancel()
            raise Yielded("long-poll gave the connection up")
        finally:
            if yieldable:
                self._poll = None
                self._yield = False
            if self.reserve is None and self.cadata is not None and scheme == "https":
                # No await since the socket was closed (MicroPython frees the session in wait_closed), so no other
                # task has allocated into the block yet. The session's objects are garbage now: collect, then hold.
                import gc
                gc.collect()
                self._hold()
            self._lock.release()
        if isinstance(r.body, list):  # read in pieces during a TLS session (see _read_exactly)
            r.body = self._join(r.body)
        return r

    def _join(self, parts):
        try:
            return b"".join(parts)  # outside the block: in the heap's other holes
        except MemoryError:
            if self.reserve is None:
                raise
        # no room elsewhere: the answer goes to the block's top end (a filler takes the bottom), the rest is held again
        n = self._let_go() - sum(len(p) for p in parts) - 512
        filler = bytearray(n) if n > 0 else None
        body = b"".join(parts)
        filler = None
        self._hold()
        return body

    def _let_go(self):
        # The block's size, and the block let go. A function of its own: a pointer to the block left on the caller's
        # value stack would keep it alive for the conservative GC (see metrics._fits).
        n = len(self.reserve)
        self.reserve = None
        HTTPClient.held = 0
        return n

    async def _exchange(self, scheme, host, port, head, body, method, timeout_ms):
        ssl = self._tls() if scheme == "https" else None
        if ssl is not None and self.cadata is not None:
            import gc
            self.reserve = None
            HTTPClient.held = 0
            gc.collect()  # the reserve, and what the last answer left in it, become the block the session's buffers use
        try:
            if self.link_check is not None:
                self.link_check()
            if ssl is None:
                conn = asyncio.open_connection(host, port)
            else:
                conn = asyncio.open_connection(host, port, ssl=ssl, server_hostname=host)
            reader, writer = await asyncio.wait_for(conn, self.connect_timeout_ms / 1000)
        except asyncio.TimeoutError:
            if self.on_io is not None:
                self.on_io(False)
            raise HTTPError("connect to %s:%d timed out" % (host, port))
        except (OSError, ValueError) as e:  # ValueError: TLS verification on the unix port
            if self.on_io is not None:  # a refusal or a TLS alert came over the link; "unreachable" may be a dead one
                n = getattr(e, "errno", 0) or 0
                self.on_io(isinstance(e, ValueError) or n == _ECONNREFUSED or n < _MBEDTLS_ERR)
            raise HTTPError("connect to %s:%d failed: %s" % (host, port, _reason(e, ssl)))
        if self.on_io is not None:
            self.on_io(True)
        try:
            return await asyncio.wait_for(self._send_receive(reader, writer, head, body, method), timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise HTTPError("no complete response from %s:%d within %d ms" % (host, port, timeout_ms))
        except (OSError, ValueError, EOFError, IndexError) as e:  # the unix port verifies at the first read
            raise HTTPError("%s:%d: %s" % (host, port, _reason(e, ssl)))
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except Exception:  # closing a broken TLS stream may raise; the socket is gone either way
                pass

    async def _send_receive(self, reader, writer, head, body, method):
        writer.write(head)
        if body:
            writer.write(body)
        await writer.drain()
        line = await reader.readline()
        if line[-1:] != b"\n":
            raise HTTPError("connection closed before the status line")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise HTTPError("malformed status line")
        status = int(parts[1])
        reason = parts[2].strip().decode() if len(parts) > 2 else ""
        headers = {}
        total = len(line)
        while True:
            line = await reader.readline()
            total += len(line)
            if total > self.max_header_bytes or len(headers) >= self.max_headers:
                raise HTTPError("response headers too large")
            if line[-1:] != b"\n":
                raise HTTPError("connection closed inside the headers")
            if line == _CRLF or line == b"\n":
                break
            i = line.find(b":")
            if i <= 0:
                raise HTTPError("malformed header line")
            headers[line[:i].strip().decode().lower()] = line[i + 1:].strip().decode()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        elif "content-length" in headers:
            cl = headers["content-length"]
            if not cl.isdigit():
                raise HTTPError("bad Content-Length")
            n = int(cl)
            if n > self.max_body:
                raise HTTPError("response body too large (%d > %d)" % (n, self.max_body))
            body = await self._read_exactly(reader, n, self.cadata is not None and n > _CHUNK)
        else:
            body = await self._read_to_eof(reader)
        return Response(status, reason, headers, body)

    async def _read_exactly(self, reader, n, pieces=False):
        # One allocation of n where the stream allows it (fewer growing copies fragmenting a Pico's heap). pieces: a
        # TLS session has the reserved block, and an answer larger than the heap's other holes would land in it and
        # keep it from being taken again; pieces of _CHUNK fit the small holes, and request() joins them afterwards.
        try:
            if pieces:
                parts = []
                while n > 0:
                    parts.append(await reader.readexactly(min(n, _CHUNK)))
                    n -= _CHUNK
                return parts
            return await reader.readexactly(n)
        except EOFError:  # CPython's IncompleteReadError is one too
            raise HTTPError("truncated body (expected %d bytes)" % n)

    async def _read_to_eof(self, reader):
        buf = b""
        while True:
            part = await reader.read(_CHUNK)
            if not part:
                return buf
            buf += part
            if len(buf) > self.max_body:
                raise HTTPError("response body too large (> %d)" % self.max_body)

    async def _read_chunked(self, reader):
        buf = b""
        while True:
            line = await reader.readline()
            if not line:
                raise HTTPError("truncated chunked body")
            size = line.split(b";", 1)[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise HTTPError("bad chunk size")
            if n < 0 or len(size) > 8:
                raise HTTPError("bad chunk size")
            if n == 0:
                break
            if len(buf) + n > self.max_body:
                raise HTTPError("response body too large (> %d)" % self.max_body)
            buf += await self._read_exactly(reader, n)
            if await reader.readline() not in (_CRLF, b"\n"):
                raise HTTPError("chunk not terminated by CRLF")
        for _ in range(self.max_headers):  # trailers up to the blank line
            line = await reader.readline()
            if not line or line in (_CRLF, b"\n"):
                return buf
        raise HTTPError("too many trailer lines")


def _reason(e, tls=None):
    # str(OSError) on MicroPython is just "[Errno 111] ECONNREFUSED"; keep the class name for the others
    s = " ".join(str(e).split())  # mbedtls messages start with a newline
    s = "%s: %s" % (type(e).__name__, s) if s else type(e).__name__
    if tls is not None and (isinstance(e, ValueError) or (getattr(e, "errno", 0) or 0) < _MBEDTLS_ERR):  # a refused certificate says what to check
        return "TLS: %s (check the settings file's ca, the server certificate's name and dates, the clock)" % s
    return s
