"""SNTP v4 responder (RFC 4330 §5, server side) on asyncio UDP.

Devices sync their clocks against `services.ntp` from registration (docs/protocol.md §7). Port 123 in production;
tests and demos use an unprivileged port (default 1123).

What it answers: a request of at least 48 bytes with version 1–4 and mode 3 (client) gets a mode-4 reply carrying
the request's transmit timestamp as the origin, the receive and transmit timestamps of this host's clock, and the
configured stratum and reference id. Anything else is dropped and counted in `SntpProtocol.stats` (an SNTP server
never answers garbage: a reply to a spoofed source would make it a reflector). Each source address has a token
bucket; over its rate the packet is dropped and counted (no Kiss-o'-Death: a KoD to a flood is still a flood).
"""
from __future__ import annotations

import asyncio
import ipaddress
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable

#: Seconds between the NTP era-0 epoch (1900-01-01) and the Unix epoch.
NTP_UNIX_OFFSET = 2208988800
PACKET_SIZE = 48
MODE_CLIENT = 3
MODE_SERVER = 4
#: log2 seconds; time.time_ns() on Linux resolves well below 2**-20 s (~1 µs).
PRECISION = -20

_HEADER = struct.Struct("!BBbb4s4s4s8s8s8s8s")  # li/vn/mode, stratum, poll, precision, delay, dispersion, refid, 4 ts


def ntp_timestamp(unix_ns: int) -> bytes:
    """64-bit NTP timestamp (32.32 fixed point, seconds since 1900) for a Unix time in nanoseconds.

    Seconds are taken modulo 2**32, which is how RFC 4330 §3 carries times past the 2036 era rollover."""
    secs, ns = divmod(unix_ns, 1_000_000_000)
    frac = (ns << 32) // 1_000_000_000
    return struct.pack("!II", (secs + NTP_UNIX_OFFSET) & 0xFFFFFFFF, frac)


def ntp_to_unix_ns(ts: bytes) -> int:
    """Inverse of `ntp_timestamp` for era 0 (1900–2036)."""
    secs, frac = struct.unpack("!II", ts)
    return (secs - NTP_UNIX_OFFSET) * 1_000_000_000 + ((frac * 1_000_000_000) >> 32)


def _ref_id_bytes(ref_id: str) -> bytes:
    # Stratum 1 carries a 4-char ASCII source name; stratum ≥ 2 the IPv4 address of the upstream server.
    try:
        return ipaddress.IPv4Address(ref_id).packed
    except ValueError:
        pass
    raw = ref_id.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"ref_id must be an IPv4 address or 1-4 ASCII characters, got {ref_id!r}")
    return raw.ljust(4, b"\0")


class SourceRateLimiter:
    """Token bucket per source address, in a table bounded to `max_sources` (least recently seen evicted first)."""

    #: Sustained queries per second allowed from one address. Real clients poll every 64 s or more; a lab of
    #: simulated devices behind one address (the `picoiot sim` case) needs far more.
    rate: float = 50.0
    #: Queries one address may send at once before the rate applies (a client's burst mode sends 8).
    burst: float = 100.0
    #: Addresses tracked at once; bounds memory under a spoofed-source flood (a forgotten source starts full).
    max_sources: int = 4096

    def __init__(self, rate: float | None = None, burst: float | None = None, max_sources: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate is not None:
            self.rate = rate
        if burst is not None:
            self.burst = burst
        if max_sources is not None:
            self.max_sources = max_sources
        if self.rate < 0 or self.burst < 1 or self.max_sources < 1:
            raise ValueError("rate must be >= 0, burst >= 1 and max_sources >= 1")
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # source -> [tokens, last refill time]

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = [self.burst, now]
        else:
            self._buckets.move_to_end(source)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False


class SntpProtocol(asyncio.DatagramProtocol):
    """Answers SNTP client requests; `stats` counts what it received, answered and dropped (and why)."""

    def __init__(self, stratum: int = 2, ref_id: str = "LOCL", limiter: SourceRateLimiter | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if not 1 <= stratum <= 15:
            raise ValueError(f"stratum must be 1..15 for a synchronised server, got {stratum}")
        self.stratum = stratum
        self.ref_id = _ref_id_bytes(ref_id)
        self.limiter = limiter if limiter is not None else SourceRateLimiter()
        self._clock = clock
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = {"received": 0, "answered": 0, "short": 0, "bad_version": 0, "bad_mode": 0,
                      "rate_limited": 0, "send_errors": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        received_ns = self._clock()  # as early as possible: it is the T2 of the client's offset computation
        self.stats["received"] += 1
        reply = self.build_reply(data, received_ns)
        if reply is None:
            return
        if not self.limiter.allow(addr[0]):
            self.stats["rate_limited"] += 1
            return
        try:
            self.transport.sendto(reply[:40] + ntp_timestamp(self._clock()), addr)  # T3 stamped last
        except OSError:
            self.stats["send_errors"] += 1
            return
        self.stats["answered"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do but count it.
        self.stats["send_errors"] += 1

    def build_reply(self, data: bytes, received_ns: int) -> bytes | None:
        """The reply to `data` with its transmit timestamp still zero, or None if `data` is not a client request."""
        if len(data) < PACKET_SIZE:  # extension fields / MAC after the 48 bytes are allowed and ignored
            self.stats["short"] += 1
            return None
        first = data[0]
        version = (first >> 3) & 0x7
        mode = first & 0x7
        if not 1 <= version <= 4:
            self.stats["bad_version"] += 1
            return None
        if mode != MODE_CLIENT:
            self.stats["bad_mode"] += 1
            return None
        poll = struct.unpack_from("!b", data, 2)[0]
        client_transmit = data[40:48]
        return _HEADER.pack(
            (0 << 6) | (version << 3) | MODE_SERVER,  # LI 0: no leap second pending; VN copied from the request
            self.stratum,
            poll,  # RFC 4330 §5: copied from the request
            PRECISION,
            b"\0\0\0\0",  # root delay: we are the reference as far as the client is concerned
            struct.pack("!I", 1 << 12),  # root dispersion 1/16 s: honest for a host clock kept by NTP
            self.ref_id,
            ntp_timestamp(received_ns),  # reference timestamp: this host clock is "set" continuously
            client_transmit,  # origin = the client's transmit timestamp, verbatim
            ntp_timestamp(received_ns),
            b"\0" * 8,
        )


async def serve_sntp(host: str = "127.0.0.1", port: int = 1123, *, stratum: int = 2, ref_id: str = "LOCL",
                     limiter: SourceRateLimiter | None = None,
                     clock: Callable[[], int] = time.time_ns) -> asyncio.DatagramTransport:
    """Start answering SNTP on UDP `host:port` in the running loop; returns the transport (`close()` it to stop).

    `port=0` picks a free port: read it from `transport.get_extra_info("sockname")[1]`. The protocol with its
    `stats` is `transport.get_protocol()`."""
    # Built before the socket: a factory that raises inside create_datagram_endpoint leaks the bound socket.
    protocol = SntpProtocol(stratum=stratum, ref_id=ref_id, limiter=limiter, clock=clock)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol,
                                                                              local_addr=(host, port))
    return transport


class SntpThread:
    """The responder on its own thread and event loop, for callers without a running loop (demos, sync tests).

    with SntpThread(port=0) as sntp: ... sntp.port ..."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1123, **kwargs) -> None:
        self.host, self.port = host, port
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def stats(self) -> dict:
        return self._transport.get_protocol().stats if self._transport else {}

    def start(self, timeout: float = 10.0) -> "SntpThread":
        self._thread = threading.Thread(target=self._run, name="picoiot-sntp", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("SNTP responder thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            try:
                self._transport = loop.run_until_complete(serve_sntp(self.host, self.port, **self._kwargs))
                self.port = self._transport.get_extra_info("sockname")[1]
            except BaseException as e:  # bind failure: hand it to start()
                self._error = e
                return
            finally:
                self._started.set()
            loop.run_forever()
            self._transport.close()
            loop.run_until_complete(asyncio.sleep(0))  # let the transport finish closing
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> "SntpThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
