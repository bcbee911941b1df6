# SNTP v4 client (RFC 4330) over non-blocking UDP: round-trip-corrected offset, several servers, retries, periodic
# resync, a drift estimate from successive offsets, and alarms through an injected callback. Without `step` the clock
# is never touched and callers read the corrected time from now_ms(); a board's Device passes step=set_clock, so the
# RTC and every timestamp (logs, alarms, JWT checks) follow each sync.
import struct

from iotlib.compat import asyncio, const, epoch_ms, ticks_ms, ticks_diff, urandom, _clk

_NTP_DELTA_S = 2208988800  # 1900-01-01 → 1970-01-01
_PKT_LEN = const(48)
_MODE_CLIENT = const(3)
_MODE_SERVER = const(4)
_LI_ALARM = const(3)

try:
    from asyncio import core as _core  # MicroPython: park the task on the asyncio poller
    _io_queue = _core._io_queue
except (ImportError, AttributeError):  # CPython
    _io_queue = None


class SNTPError(Exception):
    """One SNTP exchange failed; str(e) says why (timeout, wrong mode, kiss-o'-death, ...)."""


def _wait_readable(sock):
    yield _io_queue.queue_read(sock)


async def udp_recvfrom(sock, n):
    """(data, addr) from a non-blocking UDP socket without blocking the event loop (both runtimes)."""
    if _io_queue is not None:
        await _wait_readable(sock)
        return sock.recvfrom(n)
    loop = asyncio.get_running_loop()
    return await loop.sock_recvfrom(sock, n)


def clock_unsynced(fn=None):
    """The board's boot: the wall clock (compat.epoch_ms) reads `fn()` (default: the port's time, a board's RTC) and
    is not synced yet: log lines say so, alarms are re-dated at the first set_clock()."""
    _clk[0] = fn
    _clk[1] = 0
    _clk[2] = False


def set_clock(ms):
    """Step the device's wall clock (compat.epoch_ms) and the board's RTC to ms; the clock counts as synced from now
    on. Returns the step in ms."""
    from iotlib import hal
    step = ms - epoch_ms()
    try:
        hal.set_rtc(ms)
    except (AttributeError, OSError, ValueError, TypeError):  # a port without a settable RTC: the offset suffices
        pass
    _clk[1] += ms - epoch_ms()  # after the RTC moved (or not): what is left to step
    _clk[2] = True
    return step


def _log():
    try:
        from iotlib.log import get
    except ImportError:
        return None
    return get("timesync")


def parse_server(s, default_port=123):
    """(host, port) from "host", "host:port" or a (host, port) pair; ValueError otherwise."""
    if isinstance(s, (tuple, list)) and len(s) == 2:
        host, port = s[0], int(s[1])
    elif isinstance(s, str) and s:
        host, port = s, default_port
        if ":" in s:
            host, p = s.rsplit(":", 1)
            port = int(p)
    else:
        raise ValueError("bad SNTP server %r" % (s,))
    if not host or not 0 < port < 65536:
        raise ValueError("bad SNTP server %r" % (s,))
    return host, port


def ntp_to_ms(data, off):
    """Epoch milliseconds of the 64-bit NTP timestamp at data[off:off+8] (RFC 4330 era rule for 2036)."""
    sec, frac = struct.unpack_from("!II", data, off)
    if sec < 0x80000000:  # MSB clear: era 1, after 2036-02-07
        sec += 0x100000000
    return (sec - _NTP_DELTA_S) * 1000 + ((frac * 1000 + 0x80000000) >> 32)  # rounded to the nearest ms


def ms_to_ntp(ms):
    sec = ms // 1000 + _NTP_DELTA_S
    frac = ((ms % 1000) << 32) // 1000
    return struct.pack("!II", sec & 0xFFFFFFFF, frac)


def request_packet():
    """A client request: LI 0, version 4, mode 3, and a random transmit timestamp the server must echo."""
    nonce = urandom(8)
    return bytes(((4 << 3) | _MODE_CLIENT,)) + b"\x00" * 39 + nonce, nonce


def parse_reply(data, nonce, t0, t3):
    """(offset_ms, delay_ms, stratum) from a server reply; SNTPError for anything that must not be trusted."""
    if len(data) < _PKT_LEN:
        raise SNTPError("short packet (%d bytes)" % len(data))
    b0 = data[0]
    li, vn, mode = b0 >> 6, (b0 >> 3) & 7, b0 & 7
    if mode != _MODE_SERVER:
        raise SNTPError("not a server reply (mode %d)" % mode)
    if vn < 3 or vn > 4:
        raise SNTPError("unsupported version %d" % vn)
    stratum = data[1]
    if stratum == 0:
        code = bytes(c if 32 <= c < 127 else 63 for c in data[12:16]).decode()
        raise SNTPError("kiss-o'-death %s" % code)
    if stratum > 15:
        raise SNTPError("server unsynchronised (stratum %d)" % stratum)
    if li == _LI_ALARM:
        raise SNTPError("server unsynchronised (leap indicator 3)")
    if data[24:32] != nonce:
        raise SNTPError("origin timestamp does not echo our request")
    if data[40:48] == b"\x00" * 8:
        raise SNTPError("zero transmit timestamp")
    t1 = ntp_to_ms(data, 32)
    t2 = ntp_to_ms(data, 40)
    return ((t1 - t0) + (t2 - t3)) // 2, (t3 - t0) - (t2 - t1), stratum


class TimeSyncManager:
    """`await ts.sync()` then `ts.now_ms()`; `await ts.run()` keeps it synced every interval_s."""

    #: ms to wait for one server's reply
    timeout_ms = 1500
    #: extra rounds over the server list before a sync counts as failed
    retries = 1
    #: replies with a longer round trip are refused (the offset error is up to half of it)
    max_delay_ms = 2000
    #: |drift| above this raises the "timesync.drift" alarm (a Pico's crystal is ~±30 ppm; more means trouble)
    max_drift_ppm = 200
    #: syncs closer together than this do not update the drift estimate (too noisy)
    min_drift_span_s = 60
    #: seconds before the first retry after a failed sync (doubles up to interval_s)
    retry_s = 30

    def __init__(self, servers=(), interval_s=3600, on_alarm=None, on_clear=None, clock=epoch_ms, ticks=ticks_ms,
                 step=None):
        """step: called with the corrected epoch ms after each sync to step the clock itself (set_clock); the
        offset then starts again from 0, so successive offsets are the drift since the last step."""
        self.step = step
        self.servers = []
        self.interval_s = 3600
        self._wake = None
        self.configure(servers, interval_s)
        self.on_alarm = on_alarm
        self.on_clear = on_clear
        self._clock = clock
        self._ticks = ticks
        self.synced = False
        self.offset_ms = 0
        self.delay_ms = None
        self.drift_ppm = None
        self.server = None
        self.last_error = None
        self.syncs = 0
        self.failures = 0
        self._last_ticks = None
        self._alarms = set()

    def configure(self, servers=None, interval_s=None):
        """Apply `time.servers` / `time.interval_s` from config; raises ValueError (and changes nothing) if bad."""
        new_servers = self.servers
        if servers is not None:
            if isinstance(servers, str):
                servers = [servers]
            new_servers = [parse_server(s) for s in servers]
        if interval_s is not None and (not isinstance(interval_s, (int, float)) or interval_s < 16):
            raise ValueError("interval_s must be a number >= 16")  # RFC 4330 §10: no faster than every 15 s
        self.servers = new_servers
        if interval_s is not None:
            self.interval_s = interval_s
        if self._wake is not None:
            self._wake.set()

    def now_ms(self):
        """Corrected epoch milliseconds (the local clock until the first successful sync)."""
        return self._clock() + self.offset_ms

    async def query(self, host, port):
        """One exchange with one server → (offset_ms, delay_ms, stratum); SNTPError on any failure."""
        import socket
        s = None
        try:
            ai = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
            s = socket.socket(ai[0], socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect(ai[-1])  # the kernel then drops datagrams from anyone else
            pkt, nonce = request_packet()
            t0 = self._clock()
            s.send(pkt)
            try:
                data, _ = await asyncio.wait_for(udp_recvfrom(s, 128), self.timeout_ms / 1000)
            except asyncio.TimeoutError:
                raise SNTPError("no reply within %d ms" % self.timeout_ms)
            t3 = self._clock()
            offset, delay, stratum = parse_reply(data, nonce, t0, t3)
            if delay > self.max_delay_ms or delay < -1000:
                raise SNTPError("round trip %d ms out of range" % delay)
            return offset, delay, stratum
        except OSError as e:
            raise SNTPError("socket error: %s" % (e,))
        finally:
            if s is not None:
                s.close()

    async def sync(self):
        """Try every server in turn (best last-good first), `retries` extra rounds. True when the time was set."""
        lg = _log()
        if not self.servers:
            self.last_error = "no SNTP servers configured"
            self._fail(lg)
            return False
        order = list(self.servers)
        if self.server in order:
            order.remove(self.server)
            order.insert(0, self.server)
        for _ in range(1 + self.retries):
            for host, port in order:
                try:
                    offset, delay, stratum = await self.query(host, port)
                except SNTPError as e:
                    self.last_error = "%s:%d: %s" % (host, port, e)
                    if lg:
                        lg.warning("sntp query failed", server="%s:%d" % (host, port), reason=str(e))
                    continue
                self._accept(offset, delay, (host, port), lg)
                return True
        self._fail(lg)
        return False

    def _accept(self, offset, delay, server, lg):
        now = self._ticks()
        if self.synced and self._last_ticks is not None:
            span = ticks_diff(now, self._last_ticks)
            if span >= self.min_drift_span_s * 1000:
                # positive: the local clock runs fast (the offset to true time shrinks)
                self.drift_ppm = (self.offset_ms - offset) * 1000000 // span
        self._last_ticks = now
        self.offset_ms = offset
        if self.step is not None:
            self.step(self._clock() + offset)
            self.offset_ms = 0
        self.delay_ms = delay
        self.server = server
        self.synced = True
        self.syncs += 1
        self.last_error = None
        if lg:
            lg.info("time synced", server="%s:%d" % server, offset_ms=offset, delay_ms=delay, drift_ppm=self.drift_ppm)
        self._resolve("timesync.failed")
        if self.drift_ppm is not None and abs(self.drift_ppm) > self.max_drift_ppm:
            self._raise("timesync.drift", "warning",
                        "clock drift %d ppm exceeds %d ppm" % (self.drift_ppm, self.max_drift_ppm))
        elif self.drift_ppm is not None:
            self._resolve("timesync.drift")

    def _fail(self, lg):
        self.failures += 1
        if lg:
            lg.error("time sync failed", reason=self.last_error)
        self._raise("timesync.failed", "warning", "time sync failed: %s" % self.last_error)

    def _raise(self, key, severity, message):
        self._alarms.add(key)
        if self.on_alarm is not None:
            self.on_alarm(key, severity, message)

    def _resolve(self, key):
        if key in self._alarms:
            self._alarms.discard(key)
            if self.on_clear is not None:
                self.on_clear(key)

    async def run(self):
        """Sync now and every interval_s; after a failure retry sooner (retry_s, doubling). configure() wakes it."""
        self._wake = asyncio.Event()
        backoff = self.retry_s
        while True:
            ok = await self.sync()
            if ok:
                backoff = self.retry_s
                wait = self.interval_s
            else:
                wait = min(backoff, self.interval_s)
                backoff = min(backoff * 2, self.interval_s)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
