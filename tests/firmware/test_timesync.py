import socket

import fwtest
import peers
from peers import asyncio
from iotlib import timesync
from iotlib.timesync import TimeSyncManager, SNTPError

T = 1795000000000  # the responder's idea of "now" (epoch ms)


def reply(req, server_ms=T, li=0, vn=4, mode=4, stratum=2, echo=True, refid=b"GPS\x00", length=48):
    pkt = bytearray(48)
    pkt[0] = (li << 6) | (vn << 3) | mode
    pkt[1] = stratum
    pkt[12:16] = refid
    pkt[24:32] = req[40:48] if echo else b"\x01" * 8
    pkt[32:40] = timesync.ms_to_ntp(server_ms)  # receive
    pkt[40:48] = timesync.ms_to_ntp(server_ms + 2)  # transmit, 2 ms later
    return bytes(pkt[:length])


class Responder:
    """A real UDP SNTP peer on 127.0.0.1; fn(request) → reply bytes or None (stay silent)."""

    def __init__(self, fn):
        self.fn = fn
        self.requests = []

    async def start(self):
        base = peers._base_port()
        for i in range(40):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(socket.getaddrinfo("127.0.0.1", base + i)[0][-1])
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self.sock, self.port = s, base + i
            self.task = asyncio.create_task(self._serve())
            return "127.0.0.1:%d" % self.port
        raise OSError("no free UDP port")

    async def _serve(self):
        while True:
            data, addr = await timesync.udp_recvfrom(self.sock, 128)
            self.requests.append(data)
            out = self.fn(data)
            if out is not None:
                self.sock.sendto(out, addr)

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.sock.close()


class Clock:
    """Local epoch clock that advances `step` ms per reading, so t0/t3 (and the offset) are exact."""

    def __init__(self, now=T - 5000, step=20):
        self.now = now
        self.step = step

    def __call__(self):
        v = self.now
        self.now += self.step
        return v


async def _with(fns, body, **kw):
    rs = [Responder(fn) for fn in fns]
    servers = []
    for r in rs:
        servers.append(await r.start())
    try:
        return await body(servers, rs)
    finally:
        for r in rs:
            await r.stop()


def _mgr(servers, **kw):
    alarms = []
    cleared = []
    m = TimeSyncManager(servers, 3600, on_alarm=lambda *a: alarms.append(a), on_clear=cleared.append,
                        clock=kw.pop("clock", Clock()), **kw)
    m.timeout_ms = 150
    return m, alarms, cleared


def test_good_answer_gives_round_trip_corrected_offset():
    async def body(servers, rs):
        m, alarms, _ = _mgr(servers)
        assert not m.synced
        assert await m.sync() is True
        # t0 = T-5000, t3 = T-4980, t1 = T, t2 = T+2 → ((5000) + (4982)) // 2 = 4991, delay = 20 - 2 = 18
        assert m.offset_ms == 4991 and m.delay_ms == 18 and m.synced
        assert m.server == ("127.0.0.1", rs[0].port) and alarms == []
        req = rs[0].requests[0]
        assert len(req) == 48 and req[0] == 0x23  # LI 0, version 4, mode 3
        assert m.now_ms() == m._clock.now - 20 + 4991
    fwtest.run(_with([reply], body))


def test_bad_replies_are_rejected_with_reasons():
    cases = [
        (lambda q: reply(q, mode=3), "mode 3"),
        (lambda q: reply(q, mode=5), "mode 5"),
        (lambda q: reply(q, stratum=0, refid=b"RATE"), "kiss-o'-death RATE"),
        (lambda q: reply(q, stratum=16), "stratum 16"),
        (lambda q: reply(q, li=3), "leap indicator 3"),
        (lambda q: reply(q, length=47), "short packet (47 bytes)"),
        (lambda q: reply(q, echo=False), "origin timestamp"),
        (lambda q: reply(q, vn=1), "version 1"),
        (lambda q: reply(q, server_ms=-timesync._NTP_DELTA_S * 1000 - 2), "zero transmit"),
    ]
    async def go():
        for fn, why in cases:
            async def body(servers, rs):
                m, alarms, _ = _mgr(servers)
                m.retries = 0
                assert await m.sync() is False
                assert why in m.last_error, (why, m.last_error)
                assert not m.synced and m.offset_ms == 0 and m.failures == 1
                assert alarms and alarms[0][0] == "timesync.failed" and why in alarms[0][2]
            await _with([fn], body)
    fwtest.run(go())


def test_timeout_then_second_server():
    async def body(servers, rs):
        m, alarms, _ = _mgr(servers)
        assert await m.sync() is True
        assert len(rs[0].requests) == 1 and len(rs[1].requests) == 1
        assert m.server == ("127.0.0.1", rs[1].port) and alarms == []
        # the server that answered is asked first next time
        await m.sync()
        assert len(rs[0].requests) == 1 and len(rs[1].requests) == 2
    fwtest.run(_with([lambda q: None, reply], body))


def test_retry_round_after_all_servers_failed_once():
    n = [0]

    def flaky(q):
        n[0] += 1
        return None if n[0] == 1 else reply(q)

    async def body(servers, rs):
        m, _, _ = _mgr(servers)
        m.retries = 1
        assert await m.sync() is True and len(rs[0].requests) == 2
    fwtest.run(_with([flaky], body))


def test_failure_alarm_then_clear_on_success():
    mode = ["silent"]

    def fn(q):
        return None if mode[0] == "silent" else reply(q)

    async def body(servers, rs):
        m, alarms, cleared = _mgr(servers)
        m.retries = 0
        assert await m.sync() is False
        assert "no reply within 150 ms" in m.last_error
        assert [a[:2] for a in alarms] == [("timesync.failed", "warning")]
        mode[0] = "ok"
        assert await m.sync() is True
        assert cleared == ["timesync.failed"] and m.last_error is None
        assert await m.sync() is True and cleared == ["timesync.failed"]  # cleared once
    fwtest.run(_with([fn], body))


def test_no_listener_fails_cleanly():
    async def go():
        r = Responder(reply)
        server = await r.start()
        await r.stop()  # nothing listens there any more
        m, alarms, _ = _mgr([server])
        m.retries = 0
        assert await m.sync() is False and alarms
        m2, alarms2, _ = _mgr([])
        assert await m2.sync() is False and "no SNTP servers" in m2.last_error and alarms2
    fwtest.run(go())


def test_drift_estimate_and_alarm():
    server_now = [T]
    ticks = [0]

    async def body(servers, rs):
        clock = Clock(now=T - 5000, step=0)
        m, alarms, cleared = _mgr(servers, clock=clock, ticks=lambda: ticks[0])
        assert await m.sync() and m.offset_ms == 5001 and m.drift_ppm is None
        # 1000 s later the local clock has gained 50 ms on the server: 50 ppm fast
        ticks[0] += 1000 * 1000
        server_now[0] += 1000 * 1000
        clock.now += 1000 * 1000 + 50
        assert await m.sync() and m.offset_ms == 4951 and m.drift_ppm == 50
        assert alarms == []
        # then 400 ms in 1000 s: 400 ppm, above the 200 ppm limit
        ticks[0] += 1000 * 1000
        server_now[0] += 1000 * 1000
        clock.now += 1000 * 1000 + 400
        assert await m.sync() and m.drift_ppm == 400
        assert alarms[-1][0] == "timesync.drift" and "400 ppm" in alarms[-1][2]
        # too soon after the last sync: the estimate is kept, not recomputed from noise
        ticks[0] += 1000
        assert await m.sync() and m.drift_ppm == 400
        ticks[0] += 1000 * 1000
        server_now[0] += 1000 * 1000 + 1000
        clock.now += 1000 * 1000 + 1000
        assert await m.sync() and m.drift_ppm == 0 and cleared == ["timesync.drift"]
    fwtest.run(_with([lambda q: reply(q, server_ms=server_now[0])], body))


def test_configure_validates_and_keeps_last_good():
    m = TimeSyncManager(["pool.example:1123", ("10.0.0.1", 123), "time.example"], 600)
    assert m.servers == [("pool.example", 1123), ("10.0.0.1", 123), ("time.example", 123)]
    for bad in (["host:notaport"], ["host:0"], [""], [None], [":123"]):
        fwtest.raises(ValueError, m.configure, bad)
    fwtest.raises(ValueError, m.configure, None, 5)
    fwtest.raises(ValueError, m.configure, None, "60")
    assert len(m.servers) == 3 and m.interval_s == 600
    m.configure("one.example", 3600)
    assert m.servers == [("one.example", 123)] and m.interval_s == 3600


def test_ntp_timestamp_conversion():
    for ms in (0, 1, 999, T, T + 123, 2085978496000 + 5):  # the last is past the 2036 NTP era rollover
        assert timesync.ntp_to_ms(timesync.ms_to_ntp(ms), 0) == ms
    assert timesync.ntp_to_ms(b"\x83\xaa\x7e\x80\x80\x00\x00\x00", 0) == 500  # 1970-01-01 + 0.5 s


def test_run_resyncs_when_reconfigured():
    async def body(servers, rs):
        m, _, _ = _mgr(servers[:1])
        task = asyncio.create_task(m.run())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if m.syncs == 1:
                break
        assert m.syncs == 1 and m.server[1] == rs[0].port
        m.configure(servers[1:])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if m.syncs == 2:
                break
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert m.syncs == 2 and m.server[1] == rs[1].port
    fwtest.run(_with([reply, reply], body))


def test_parse_reply_direct():
    pkt, nonce = timesync.request_packet()
    assert len(pkt) == 48 and pkt[40:] == nonce
    off, delay, stratum = timesync.parse_reply(reply(pkt), nonce, T - 10, T + 10)
    assert (off, delay, stratum) == (1, 18, 2)
    e = fwtest.raises(SNTPError, timesync.parse_reply, b"", nonce, 0, 0)
    assert "short" in str(e)


def test_step_sets_the_clock_itself_and_drift_still_follows():
    server_now = [T]
    ticks = [0]
    stepped = []

    async def body(servers, rs):
        clock = Clock(now=T - 5000, step=0)

        def step(ms):  # what set_clock does to the device's wall clock
            stepped.append(ms)
            clock.now = ms

        m, alarms, _ = _mgr(servers, clock=clock, ticks=lambda: ticks[0], step=step)
        assert await m.sync() and stepped == [T + 1] and m.offset_ms == 0 and m.now_ms() == T + 1
        ticks[0] += 1000 * 1000
        server_now[0] += 1000 * 1000
        clock.now += 1000 * 1000 + 50  # 50 ms gained in 1000 s
        assert await m.sync() and m.drift_ppm == 50 and m.offset_ms == 0
        assert stepped[-1] == server_now[0] + 1
    fwtest.run(_with([lambda q: reply(q, server_ms=server_now[0])], body))
