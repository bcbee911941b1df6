# Passive WebSocket stream of sensor frames at /ws (microdot#34 asks for a broadcast helper; this is ours).
# - Auth happens before the upgrade, through DeviceWeb's guard: 401/403/429 are plain HTTP answers. The token may come
#   as "Authorization: Bearer", "?token=" or a Sec-WebSocket-Protocol entry "bearer.<token>" (offer "picoiot" too:
#   the server answers with that protocol, as browsers require).
# - Each sample is serialised once per distinct field selection and the same encoded frame goes to every client that
#   asked for it: {"seq", "ts", "values": {…}}.
# - Client → server messages (text, JSON): {"type": "subscribe", "fields": [...]?, "rate_hz": n?} narrows the stream and
#   is answered {"type": "subscribed", "fields", "rate_hz"}; a subscribe naming an unknown field or a bad rate is
#   answered {"type": "error", "error": …} and changes nothing. Invalid JSON or an unknown "type" closes with 1003;
#   a client sending more than its message budget closes with 1008; an oversized message with 1009.
# - Server pings every ping_interval_s (one task for all clients); a client silent for two intervals is dropped at the
#   next ping. A client whose queue is full or whose send takes longer than send_timeout_s is dropped (close 1008
#   attempted) — never buffered without bound.
# - After the upgrade the connection is detached from its request (DeviceWeb.detach): a session holds only its own
#   state, two small tasks (receiver, sender) and the socket.
import json
from iotlib.compat import asyncio, ticks_ms, ticks_diff, memory_error
from iotlib import log as _logmod
from iotlib.web import error, HANDLED

_log = _logmod.get("ws")
_CLOSE = 8
_PING = 9
_PONG = 10
_TEXT = 1


def _frame(opcode, payload):
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126, n >> 8, n & 0xFF))
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def _accept_key(req):
    # RFC 6455 §4.2.1/§4.2.2 (what microdot.websocket does, without loading that module: a Pico's heap is scarce)
    h = req.headers
    key = h.get("Sec-WebSocket-Key")
    if not key or "upgrade" not in (h.get("Connection") or "").lower() or \
            (h.get("Upgrade") or "").lower() != "websocket":
        return None
    import hashlib
    import binascii
    sha1 = getattr(hashlib, "sha1", None)
    if sha1 is None:  # a port built without SHA-1 (a unix build without TLS); a Pico W has it built in
        from iotlib.hal import sha1
    return binascii.b2a_base64(sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())[:-1]


def _close_frame(code, reason=""):
    return _frame(_CLOSE, bytes((code >> 8, code & 0xFF)) + reason.encode())


class _Client:
    __slots__ = ("writer", "reader", "fields", "key", "period_ms", "last_sent", "queue", "wake", "last_rx", "dropped", "sent",
                 "tokens", "tokens_at", "addr")

    def __init__(self, reader, writer, addr):
        self.reader = reader
        self.writer = writer
        self.addr = addr
        self.fields = None  # None: every field
        self.key = None
        self.period_ms = 0
        self.last_sent = None
        self.queue = []
        self.wake = asyncio.Event()
        self.last_rx = ticks_ms()
        self.dropped = None  # reason, once dropped
        self.sent = 0
        self.tokens = 0.0
        self.tokens_at = ticks_ms()


class WSStream:
    #: WebSocket clients at once. lwIP on a Pico W has 5 TCP PCBs: one stays for the control-plane client and one for
    #: REST calls, so 3 stream clients; a 4th gets 503 before the upgrade.
    max_clients = 3
    #: Encoded frames waiting per client; a client that lets more pile up is too slow and is dropped.
    max_queue = 4
    #: Seconds one frame may take to send before the client is dropped.
    send_timeout_s = 2
    #: Seconds between server pings; two intervals without any frame from the client drop it.
    ping_interval_s = 20
    #: Largest client message accepted (bytes); larger closes with 1009.
    max_message = 512
    #: Client messages per second sustained (burst max_msg_burst); more closes with 1008.
    max_msg_rate = 2
    max_msg_burst = 5
    #: Highest per-client frame rate a subscribe may ask for.
    max_rate_hz = 50

    def __init__(self, web, path="/ws", role="viewer", fields=None):
        """web: DeviceWeb (auth, rate limit, connection cap apply before the upgrade). fields(): names a client may
        subscribe to (default: whatever the published snapshots carry)."""
        self.web = web
        self.clients = []
        self._fields = fields
        self._cache = {}
        self.frames = 0
        self.dropped = 0
        self.last_snapshot = None
        self.role = role
        self._pinger = None
        web.route(path, False, self._handler)  # auth inside: refusals go out as HTTP/1.1 (WebSocket clients want it)

    # --- broadcast ---------------------------------------------------------------------------------------------------
    def publish(self, snap):
        """Queue snapshot {seq, ts, values} for every client that is due (by its rate); serialised once per field
        selection."""
        self.last_snapshot = snap
        self._cache = {}
        now = ticks_ms()
        for c in self.clients:
            if c.dropped:
                continue
            if c.last_sent is not None and c.period_ms and ticks_diff(now, c.last_sent) < c.period_ms:
                continue
            data = self._cache.get(c.key)
            if data is None:
                try:
                    values = snap["values"]
                    if c.fields is not None:
                        values = {k: values.get(k) for k in c.fields}
                    data = _frame(_TEXT, json.dumps({"seq": snap["seq"], "ts": snap["ts"], "values": values}).encode())
                except MemoryError:  # this frame is skipped for this client; the next snapshot is sent as ever
                    memory_error("ws")
                    continue
                self._cache[c.key] = data
                self.frames += 1
            if len(c.queue) >= self.max_queue:
                self._drop(c, "send queue full")
                continue
            c.last_sent = now
            c.queue.append(data)
            c.wake.set()
        self._cache = {}

    def _drop(self, c, reason):
        if not c.dropped:
            c.dropped = reason
            self.dropped += 1
            del c.queue[:]
            _log.warning("ws client dropped", reason=reason)
            c.wake.set()

    # --- one connection --------------------------------------------------------------------------------------------
    async def _handler(self, req):
        denied = self.web.check(req, self.role)
        if denied is None and len(self.clients) >= self.max_clients:
            denied = error(503, "too many stream clients (max %d)" % self.max_clients, {"Retry-After": "5"})
        if denied is not None:
            # A WebSocket client (RFC 6455 §4.1) only takes an HTTP/1.1 answer; the device API writes HTTP/1.0.
            body, status, headers = denied
            extra = "".join("%s: %s\r\n" % (k, headers[k]) for k in headers)
            await self.web._raw_answer(req.sock[1], status, body["error"], extra, "1.1")
            return HANDLED
        accept = _accept_key(req)
        if accept is None:
            return error(400, "not a WebSocket upgrade request")
        offered = [p.strip() for p in (req.headers.get("Sec-WebSocket-Protocol") or "").split(",")]
        w = req.sock[1]
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
        head += accept + b"\r\n"
        if "picoiot" in offered:
            head += b"Sec-WebSocket-Protocol: picoiot\r\n"
        await w.awrite(head + b"\r\n")
        # The session outlives its request by minutes: detached, it keeps only its own state (the request, its headers
        # and URL with the token, and the frames that dispatched it are garbage once this returns).
        reader, w = self.web.detach(req)
        c = _Client(reader, w, req.client_addr)
        c.tokens = float(self.max_msg_burst)
        self.clients.append(c)
        asyncio.create_task(self._session(c))
        if self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_loop())
        return HANDLED

    async def _session(self, c):
        sender = asyncio.create_task(self._send_loop(c))
        try:
            await self._recv_loop(c)
        except Exception as e:  # reset, EOF, bad frame: the client is gone
            if isinstance(e, MemoryError):
                memory_error("ws")
            if not c.dropped:
                c.dropped = "closed: " + (str(e) or e.__class__.__name__)
        finally:
            if c in self.clients:
                self.clients.remove(c)
            if not self.clients and self._pinger is not None:  # the last one: no task sleeps on for nobody
                self._pinger.cancel()
                self._pinger = None
            c.wake.set()
            try:
                await asyncio.wait_for(sender, 1)
            except Exception:
                pass
            await self.web.release(c.writer)

    async def _ping_loop(self):
        # One task for every client (not a timed wait in each sender): every ping_interval_s each client gets a ping,
        # or is dropped if nothing came from it for two intervals.
        while self.clients:
            await asyncio.sleep(self.ping_interval_s)
            now = ticks_ms()
            for c in self.clients:
                if c.dropped:
                    continue
                if ticks_diff(now, c.last_rx) > 2000 * self.ping_interval_s:
                    self._drop(c, "no answer to pings")
                    c.queue.append(_close_frame(1001, "ping timeout"))
                else:
                    c.queue.append(_frame(_PING, b""))
                c.wake.set()
        self._pinger = None

    async def _recv_loop(self, c):
        r = c.reader
        while not c.dropped:
            head = await r.readexactly(2)  # EOF raises: the client is gone
            opcode = head[0] & 0x0F
            n = head[1] & 0x7F
            if n == 126:
                x = await r.readexactly(2)
                n = (x[0] << 8) | x[1]
            elif n == 127:
                await r.readexactly(8)
                n = self.max_message + 1
            if n > self.max_message:
                await self._close(c, 1009, "message too large")
                return
            mask = await r.readexactly(4) if head[1] & 0x80 else None
            payload = await r.readexactly(n) if n else b""
            if mask:
                payload = bytes(payload[i] ^ mask[i & 3] for i in range(n))
            c.last_rx = ticks_ms()
            if opcode == _CLOSE:
                await self._close(c, 1000, "")
                return
            if opcode == _PING:
                c.queue.append(_frame(_PONG, payload))
                c.wake.set()
                continue
            if opcode == _PONG:
                continue
            if not self._budget(c):
                await self._close(c, 1008, "too many messages")
                return
            await self._message(c, payload, opcode)

    def _budget(self, c):
        now = ticks_ms()
        c.tokens = min(float(self.max_msg_burst), c.tokens + ticks_diff(now, c.tokens_at) * self.max_msg_rate / 1000)
        c.tokens_at = now
        if c.tokens < 1:
            return False
        c.tokens -= 1
        return True

    async def _message(self, c, payload, opcode):
        try:
            msg = json.loads(payload) if opcode == _TEXT else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            await self._close(c, 1003, "expected a JSON subscribe message")
            return
        fields = msg.get("fields")
        rate = msg.get("rate_hz")
        known = self._fields() if self._fields else list((self.last_snapshot or {}).get("values", {}))
        err = None
        if fields is not None:
            if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
                err = "fields must be a non-empty list of names"
            else:
                bad = [f for f in fields if f not in known]
                if bad:
                    err = "unknown fields: " + ", ".join(bad)
        if err is None and rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool)
                                                 or rate <= 0 or rate > self.max_rate_hz):
            err = "rate_hz must be a number in (0, %d]" % self.max_rate_hz
        if err:
            c.queue.append(_frame(_TEXT, json.dumps({"type": "error", "error": err}).encode()))
        else:
            if fields is not None:
                c.fields = sorted(set(fields))
                c.key = ",".join(c.fields)
            if rate is not None:
                c.period_ms = int(1000 / rate)
            c.last_sent = None  # a new subscription starts with the next sample
            c.queue.append(_frame(_TEXT, json.dumps({"type": "subscribed", "fields": c.fields or sorted(known),
                                                    "rate_hz": (1000 / c.period_ms) if c.period_ms else None}).encode()))
        c.wake.set()

    async def _close(self, c, code, reason):
        c.queue.append(_close_frame(code, reason))
        c.wake.set()
        c.dropped = c.dropped or ("close %d %s" % (code, reason))
        await asyncio.sleep(0)

    async def _send_loop(self, c):
        try:
            while True:
                if not c.queue:
                    if c.dropped or c not in self.clients:
                        break
                    c.wake.clear()
                    await c.wake.wait()
                    continue
                data = c.queue.pop(0)
                await asyncio.wait_for(c.writer.awrite(data), self.send_timeout_s)
                c.sent += 1
                if data[0] == 0x80 | _CLOSE:
                    # Closing handshake: give the client a moment and swallow what it still sends, else closing
                    # on unread data resets the connection and the client never sees our close code.
                    await self.web._drain(c.reader, 4096, 0.1)
                    break
        except asyncio.TimeoutError:
            self._drop(c, "send timed out")
        except Exception as e:
            if not c.dropped:
                c.dropped = "send failed: %r" % (e,)
        # Closing the socket ends the receive loop of this client too.
        try:
            await asyncio.wait_for(c.writer.aclose(), 1)
        except Exception:
            pass
        if c in self.clients:
            self.clients.remove(c)
