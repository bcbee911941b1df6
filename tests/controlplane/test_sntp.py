"""The SNTP responder over real UDP sockets on 127.0.0.1: hand-made packets, ntplib, malformed input, rate limits."""
from __future__ import annotations

import asyncio
import socket
import struct
import time

import ntplib
import pytest

from picoiot.server.sntp import (NTP_UNIX_OFFSET, SntpThread, SourceRateLimiter, ntp_timestamp, ntp_to_unix_ns,
                                 serve_sntp)

# Safety net only: every test waits on an event it provokes, never on the clock.
RECV_TIMEOUT = 10.0


def client_packet(transmit: bytes = b"\x12\x34\x56\x78\x9a\xbc\xde\xf0", version: int = 4, mode: int = 3,
                  poll: int = 6) -> bytes:
    return bytes([(version << 3) | mode, 0, poll, 0]) + b"\0" * 36 + transmit


def udp_client(bind: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.setblocking(False)
    return s


async def recv(sock: socket.socket) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1024), RECV_TIMEOUT)


async def until_received(proto, n: int) -> None:
    # The responder handles each datagram synchronously, so once it has counted n, every reply it sent is queued.
    async def wait():
        while proto.stats["received"] < n:
            await asyncio.sleep(0.005)
    await asyncio.wait_for(wait(), RECV_TIMEOUT)


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1024))
        except BlockingIOError:
            return out


@pytest.fixture
async def sntp():
    transport = await serve_sntp("127.0.0.1", 0)
    yield transport
    transport.close()


def port_of(transport) -> int:
    return transport.get_extra_info("sockname")[1]


async def test_reply_fields_follow_rfc4330(sntp):
    sock = udp_client()
    t1 = time.time_ns()
    sock.sendto(client_packet(version=4, poll=10), ("127.0.0.1", port_of(sntp)))
    reply = await recv(sock)
    t4 = time.time_ns()
    sock.close()
    assert len(reply) == 48
    assert reply[0] >> 6 == 0  # LI: no warning
    assert (reply[0] >> 3) & 7 == 4  # version copied
    assert reply[0] & 7 == 4  # server mode
    assert reply[1] == 2  # stratum
    assert struct.unpack("!b", reply[2:3])[0] == 10  # poll copied
    assert reply[12:16] == b"LOCL"
    assert reply[24:32] == b"\x12\x34\x56\x78\x9a\xbc\xde\xf0"  # origin = our transmit timestamp
    t2, t3 = ntp_to_unix_ns(reply[32:40]), ntp_to_unix_ns(reply[40:48])
    # Same host clock on both sides: causality must hold (up to the 32-bit fraction's rounding).
    assert t1 - 1000 <= t2 <= t3 <= t4 + 1000


async def test_version_3_request_gets_version_3_reply(sntp):
    sock = udp_client()
    sock.sendto(client_packet(version=3), ("127.0.0.1", port_of(sntp)))
    reply = await recv(sock)
    sock.close()
    assert (reply[0] >> 3) & 7 == 3 and reply[0] & 7 == 4


async def test_timestamps_come_from_the_injected_clock_exactly():
    fixed = 1_795_000_000_250_000_000  # 2026-11-18 ... .25 s
    transport = await serve_sntp("127.0.0.1", 0, stratum=3, ref_id="10.0.0.1", clock=lambda: fixed)
    sock = udp_client()
    sock.sendto(client_packet(), ("127.0.0.1", port_of(transport)))
    reply = await recv(sock)
    sock.close()
    transport.close()
    expected = struct.pack("!II", 1_795_000_000 + NTP_UNIX_OFFSET, 1 << 30)  # .25 s = 2**30 / 2**32
    assert reply[32:40] == expected and reply[40:48] == expected and reply[16:24] == expected
    assert reply[1] == 3
    assert reply[12:16] == bytes([10, 0, 0, 1])


async def test_ntplib_client_sees_a_sane_server(sntp):
    port = port_of(sntp)
    response = await asyncio.to_thread(ntplib.NTPClient().request, "127.0.0.1", 4, port, RECV_TIMEOUT)
    assert response.mode == 4 and response.stratum == 2 and response.version == 4
    assert ntplib.ref_id_to_text(response.ref_id, response.stratum) != ""
    # The server reads this host's clock: the offset ntplib computes is a measurement error, not a real offset.
    assert abs(response.offset) < 1.0
    assert response.delay >= 0


async def test_extension_bytes_after_the_header_are_ignored(sntp):
    sock = udp_client()
    sock.sendto(client_packet() + b"\0" * 20, ("127.0.0.1", port_of(sntp)))  # e.g. key id + MAC
    reply = await recv(sock)
    sock.close()
    assert len(reply) == 48 and reply[0] & 7 == 4


async def test_malformed_and_non_client_packets_are_dropped_and_counted(sntp):
    proto = sntp.get_protocol()
    sock = udp_client()
    addr = ("127.0.0.1", port_of(sntp))
    sock.sendto(b"", addr)
    sock.sendto(b"\x23" * 47, addr)  # one byte short
    sock.sendto(client_packet(mode=4), addr)  # a server reply sent to us: must not ping-pong
    sock.sendto(client_packet(mode=1), addr)  # symmetric active: not served
    sock.sendto(client_packet(mode=6), addr)  # control message
    sock.sendto(client_packet(version=0), addr)
    sock.sendto(client_packet(version=7), addr)
    sock.sendto(client_packet(transmit=b"GOODPKT!"), addr)
    reply = await recv(sock)
    await until_received(proto, 8)
    rest = drain(sock)
    sock.close()
    assert reply[24:32] == b"GOODPKT!"  # the first (and only) answer is to the one valid request
    assert rest == []
    assert proto.stats["short"] == 2
    assert proto.stats["bad_mode"] == 3
    assert proto.stats["bad_version"] == 2
    assert proto.stats["answered"] == 1


async def test_rate_limit_per_source_address():
    limiter = SourceRateLimiter(rate=0.0, burst=3)  # no refill: the test does not depend on timing
    transport = await serve_sntp("127.0.0.1", 0, limiter=limiter)
    proto = transport.get_protocol()
    addr = ("127.0.0.1", port_of(transport))
    flooder = udp_client("127.0.0.1")
    for i in range(6):
        flooder.sendto(client_packet(transmit=struct.pack("!Q", i)), addr)
    await until_received(proto, 6)
    answered = drain(flooder)
    # Another address has its own bucket (the whole 127/8 is loopback on Linux).
    other = udp_client("127.0.0.2")
    other.sendto(client_packet(transmit=b"OTHERSRC"), addr)
    other_reply = await recv(other)
    flooder.close()
    other.close()
    transport.close()
    assert [r[24:32] for r in answered] == [struct.pack("!Q", i) for i in range(3)]
    assert proto.stats["rate_limited"] == 3
    assert other_reply[24:32] == b"OTHERSRC"


def test_rate_limiter_refills_over_time_and_keeps_its_table_bounded():
    now = [0.0]
    limiter = SourceRateLimiter(rate=2.0, burst=2, max_sources=2, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a")
    assert not limiter.allow("a")
    now[0] = 0.5  # one token back at 2/s
    assert limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")
    assert limiter.allow("c")  # table full: evicts "a", the least recently seen
    assert len(limiter) == 2
    assert limiter.allow("a") and limiter.allow("a")  # "a" forgotten, so it starts with a full bucket again
    assert len(limiter) == 2


def test_invalid_settings_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="stratum"):
        asyncio.run(serve_sntp("127.0.0.1", 0, stratum=0))
    with pytest.raises(ValueError, match="ref_id"):
        asyncio.run(serve_sntp("127.0.0.1", 0, ref_id="TOOLONG"))
    with pytest.raises(ValueError, match="burst"):
        SourceRateLimiter(burst=0)


async def test_port_in_use_is_an_oserror(sntp):
    with pytest.raises(OSError):
        await serve_sntp("127.0.0.1", port_of(sntp))


def test_thread_helper_serves_ntplib_and_stops():
    with SntpThread("127.0.0.1", 0, stratum=4) as server:
        assert server.port != 0
        response = ntplib.NTPClient().request("127.0.0.1", 4, server.port, RECV_TIMEOUT)
        assert response.stratum == 4
        assert server.stats["received"] == 1  # "answered" is counted after the send: racy to read from here
        port = server.port
    # Stopped: the port can be bound again.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.close()


def test_thread_helper_reports_a_bind_failure():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            SntpThread("127.0.0.1", s.getsockname()[1]).start()
    finally:
        s.close()


def test_ntp_timestamp_encoding_and_era_rollover():
    assert ntp_timestamp(0) == struct.pack("!II", NTP_UNIX_OFFSET, 0)
    assert ntp_to_unix_ns(ntp_timestamp(1_795_000_000_123_456_789)) // 1000 == 1_795_000_000_123_456
    # 2036-02-07 06:28:16 UTC is NTP second 2**32: era 1 starts again at 0.
    era1 = (2**32 - NTP_UNIX_OFFSET) * 1_000_000_000
    assert ntp_timestamp(era1) == b"\0" * 8
