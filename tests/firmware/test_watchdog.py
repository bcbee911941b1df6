import json
import fwtest
import picosim as sim
from iotlib import hal, log, fsutil
from iotlib.compat import asyncio
from iotlib.watchdog import WatchdogManager


class _Lines:
    def __init__(self):
        self.buf = []

    def write(self, s):
        if s != "\n":  # the logger writes each line, then its newline
            self.buf.append(s)

    def records(self, msg=None):
        recs = [json.loads(l) for l in self.buf]
        return [r for r in recs if msg is None or r["msg"] == msg]


def _setup(**kw):
    """A manual-clock board and a WatchdogManager whose sleeps run on it (board.vsleep / board.run_for)."""
    b = sim.configure(flash_root=fwtest.tmpdir("flash"), clock="manual")
    lines = _Lines()
    log.configure(level="debug", console=lines)
    kw.setdefault("sleep_ms", b.vsleep)
    return b, WatchdogManager(**kw), lines


def _done():
    log.configure()


async def _hang():
    await asyncio.Event().wait()


# ---------------------------------------------------------------- construction and bookkeeping
def test_rejects_wdt_timeout_above_rp2040_maximum_and_bad_names():
    _setup()
    fwtest.raises(ValueError, WatchdogManager, wdt_timeout_ms=8389)
    fwtest.raises(ValueError, WatchdogManager, wdt_timeout_ms=0)
    wdm = WatchdogManager(wdt_timeout_ms=8388)
    wdm.supervise("a", _hang)
    fwtest.raises(ValueError, wdm.supervise, "a", _hang)
    fwtest.raises(KeyError, wdm.checkin, "typo")
    _done()


# ---------------------------------------------------------------- crashes
def test_crashing_task_restarts_with_backoff_and_is_reported():
    crashes = []
    b, wdm, lines = _setup(on_crash=lambda name, exc: crashes.append((name, type(exc).__name__, str(exc))))
    runs = [0]

    async def flaky():
        runs[0] += 1
        wdm.checkin("flaky")
        if runs[0] <= 3:
            raise ValueError("sensor glitch %d" % runs[0])
        while True:
            wdm.checkin("flaky")
            await b.vsleep(500)

    wdm.supervise("flaky", flaky)

    async def main():
        task = asyncio.create_task(wdm.run())
        await b.run_for(20000)
        task.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert runs[0] == 4
    assert crashes == [("flaky", "ValueError", "sensor glitch 1"), ("flaky", "ValueError", "sensor glitch 2"),
                       ("flaky", "ValueError", "sensor glitch 3")]
    recs = lines.records("task crashed")
    delays = [r["restart_in_ms"] for r in recs]
    assert 250 <= delays[0] <= 500 and 500 <= delays[1] <= 1000 and 1000 <= delays[2] <= 2000
    assert recs[0]["error"] == "ValueError: sensor glitch 1" and recs[0]["level"] == "error"
    assert "in flaky" in recs[0]["traceback"]
    st = wdm.stats()["tasks"]["flaky"]
    assert st["state"] == "running" and st["crashes"] == 3
    assert wdm.feeds >= 19 and wdm.starving is None and b.reset_count == 0
    _done()


def test_backoff_starts_afresh_after_a_stable_run_and_is_capped():
    b, wdm, lines = _setup()
    wdm.stable_ms = 10000
    wdm.restart_max_ms = 4000
    runs = [0]

    async def task():
        runs[0] += 1
        if runs[0] == 5:
            for _ in range(30):  # a long healthy run...
                wdm.checkin("t")
                await b.vsleep(500)
        raise OSError(runs[0])  # ...ends in a crash like the others

    wdm.supervise("t", task)

    async def main():
        t = asyncio.create_task(wdm.run())
        await b.run_for(60000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    rows = [(r["in_a_row"], r["restart_in_ms"]) for r in lines.records("task crashed")]
    assert [n for n, _ in rows[:6]] == [1, 2, 3, 4, 1, 2]
    assert 2000 <= rows[3][1] <= 4000  # 500 * 2**3 = 4000: at the cap
    assert 250 <= rows[4][1] <= 500  # after the stable run
    assert all(d <= 4000 for _, d in rows)
    _done()


def test_failing_on_crash_callback_is_contained():
    def bad_alarm(name, exc):
        raise RuntimeError("alarm store full")

    b, wdm, lines = _setup(on_crash=bad_alarm)
    runs = [0]

    async def once():
        runs[0] += 1
        if runs[0] == 1:
            raise ValueError("x")

    wdm.supervise("once", once, critical=False)

    async def main():
        t = asyncio.create_task(wdm.run())
        await b.run_for(5000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert runs[0] == 2 and wdm.stats()["tasks"]["once"]["state"] == "done"
    assert lines.records("on_crash callback failed")[0]["error"] == "RuntimeError: alarm store full"
    _done()


# ---------------------------------------------------------------- the hardware watchdog
def _sampler(b, wdm, hang_at_ms=None, resume_at_ms=None):
    async def sampler():
        while True:
            wdm.checkin("sampler")
            await b.vsleep(100)
            now = b.now_ms()
            if hang_at_ms is not None and now >= hang_at_ms and (resume_at_ms is None or now < resume_at_ms):
                if resume_at_ms is None:
                    await _hang()
                await b.vsleep(resume_at_ms - now)
    return sampler


def test_healthy_tasks_keep_the_wdt_fed():
    b, wdm, _ = _setup(wdt_timeout_ms=2000)
    wdm.supervise("sampler", _sampler(b, wdm), window_ms=1000)

    async def main():
        t = asyncio.create_task(wdm.run())
        await b.run_for(120000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert b.reset_count == 0 and b.last_reset is None
    assert wdm.feeds >= 120 and b.wdt_feeds == wdm.feeds
    _done()


def test_stuck_critical_task_stops_feeding_and_the_wdt_resets_the_board():
    b, wdm, lines = _setup(wdt_timeout_ms=2000)
    wdm.supervise("sampler", _sampler(b, wdm, hang_at_ms=5000), window_ms=1000)
    wdm.supervise("noncritical", _hang, critical=False)  # never checks in; must not matter

    async def main():
        asyncio.create_task(wdm.run())
        await b.run_for(60000)

    e = fwtest.raises(sim.SimulatedReset, fwtest.run, main())
    assert e.cause == "watchdog"
    assert 7000 <= b.now_ms() <= 10000  # feeding stopped ~1 s after the hang, then the 2 s timeout ran out
    crit = lines.records("critical task missed its check-in window: watchdog no longer fed, the board will reset")
    assert len(crit) == 1 and crit[0]["task"] == "sampler" and crit[0]["level"] == "critical"
    b.boot()
    wdm2 = WatchdogManager()
    rep = wdm2.boot_report()
    assert rep["reset_cause"] == "watchdog"
    assert rep["detail"]["reason"] == "task_stalled" and rep["detail"]["task"] == "sampler"
    assert wdm2.boot_report() is rep and hal.reset_cause() == "watchdog"
    assert not fsutil.exists(hal.flash_path(".reset_detail"))
    _done()


def test_task_that_recovers_in_time_resumes_feeding():
    b, wdm, lines = _setup(wdt_timeout_ms=8000)
    wdm.supervise("sampler", _sampler(b, wdm, hang_at_ms=3000, resume_at_ms=7000), window_ms=1000)

    async def main():
        t = asyncio.create_task(wdm.run())
        await b.run_for(5500)
        assert wdm.starving == "sampler" and fsutil.exists(hal.flash_path(".reset_detail"))
        await b.run_for(20000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert b.last_reset is None and wdm.starving is None
    assert not fsutil.exists(hal.flash_path(".reset_detail"))
    assert len(lines.records("critical tasks checking in again; watchdog fed")) == 1
    _done()


def test_boot_report_after_power_on_and_after_hal_reset():
    b, wdm, lines = _setup()
    assert wdm.boot_report() == {"reset_cause": "power_on"}
    fwtest.raises(sim.SimulatedReset, hal.reset)
    b.boot()
    assert WatchdogManager().boot_report() == {"reset_cause": "hard"}
    assert lines.records("boot")[0]["reset_cause"] == "power_on"
    _done()


# ---------------------------------------------------------------- heartbeat
class _Server:
    """A scripted heartbeat peer: each call takes the next outcome ("ok", "noack", an exception or "hang")."""

    def __init__(self, outcomes, default="ok"):
        self.outcomes = list(outcomes)
        self.default = default
        self.bodies = []

    async def send(self, body):
        self.bodies.append(body)
        o = self.outcomes.pop(0) if self.outcomes else self.default
        if isinstance(o, BaseException):
            raise o
        if o == "hang":
            await _hang()
        if o == "noack":
            return {"ack": body["seq"] - 1}
        return {"ack": body["seq"], "server_time": 1795000000000, "pending": {"config_version": 8}}


def _ladder(wdm, server, steps, **kw):
    def step(name, fail=False):
        async def cb():
            steps.append((name, wdm.missed))
            if fail:
                raise OSError("step " + name + " failed")
        return cb
    wdm.heartbeat(server.send, reconnect=step("reconnect", kw.get("fail_reconnect")),
                  reregister=step("reregister"), persist=step("persist"),
                  reset=kw.get("reset", step("reset")), payload=kw.get("payload"), on_answer=kw.get("on_answer"))


def test_missed_heartbeats_escalate_in_order_reconnect_reregister_persist_reset():
    b, wdm, lines = _setup()
    server = _Server([], default=OSError(113))
    steps = []
    _ladder(wdm, server, steps)
    results = [fwtest.run(wdm.beat()) for _ in range(10)]
    assert results == [False] * 10
    assert steps == [("reconnect", 3), ("reregister", 5), ("persist", 10), ("reset", 10)]
    assert [b["seq"] for b in server.bodies] == list(range(1, 11))
    assert fsutil.read_json(hal.flash_path(".reset_detail")) == {"reason": "heartbeat", "missed": 10}
    esc = [r["step"] for r in lines.records("heartbeat escalation")]
    assert esc == ["reconnect", "reregister", "persist", "reset"]
    _done()


def test_an_answer_resets_the_missed_count():
    b, wdm, lines = _setup()
    server = _Server([OSError(110)] * 4 + ["ok"] + [OSError(110)] * 4)
    steps = []
    _ladder(wdm, server, steps)
    for _ in range(9):
        fwtest.run(wdm.beat())
    assert steps == [("reconnect", 3), ("reconnect", 3)]  # a new episode, never reaching re-registration
    assert wdm.missed == 4 and wdm.missed_total == 8 and wdm.acks == 1
    assert lines.records("heartbeat answered again")[0]["after_missed"] == 4
    _done()


def test_wrong_ack_and_timeout_count_as_missed_and_answers_reach_on_answer():
    b, wdm, lines = _setup()
    wdm.heartbeat_timeout_ms = 20
    answers = []
    server = _Server(["noack", "hang", "ok"])
    steps = []
    _ladder(wdm, server, steps, payload=lambda: {"rssi": -61, "firmware": "0.1.0"}, on_answer=answers.append)
    assert fwtest.run(wdm.beat()) is False
    assert fwtest.run(wdm.beat()) is False
    assert fwtest.run(wdm.beat()) is True
    assert answers == [{"ack": 3, "server_time": 1795000000000, "pending": {"config_version": 8}}]
    body = server.bodies[2]
    assert body["seq"] == 3 and body["rssi"] == -61 and body["firmware"] == "0.1.0"
    assert "uptime" in body and "mem_free" in body
    assert lines.records("heartbeat answer without our ack")[0]["seq"] == 1
    assert "TimeoutError" in lines.records("heartbeat failed")[0]["error"]
    _done()


def test_failing_step_does_not_stop_the_ladder():
    b, wdm, lines = _setup()
    server = _Server([], default=OSError(113))
    steps = []
    _ladder(wdm, server, steps, fail_reconnect=True)
    for _ in range(10):
        fwtest.run(wdm.beat())
    assert [s[0] for s in steps] == ["reconnect", "reregister", "persist", "reset"]
    assert lines.records("heartbeat escalation step failed")[0]["step"] == "reconnect"
    _done()


def test_without_reset_the_ladder_repeats_and_never_resets():
    b, wdm, _ = _setup()
    wdm.missed_reset = None
    server = _Server([], default=OSError(113))
    steps = []
    _ladder(wdm, server, steps)
    for _ in range(20):
        fwtest.run(wdm.beat())
    assert steps == [("reconnect", 3), ("reregister", 5), ("reconnect", 8), ("reregister", 10),
                     ("reconnect", 13), ("reregister", 15), ("reconnect", 18), ("reregister", 20)]
    _done()


def test_default_reset_persists_then_resets_the_board():
    b, wdm, _ = _setup()
    server = _Server([], default=OSError(113))
    order = []

    async def persist():
        order.append("persist")
        fsutil.write_json_atomic(hal.flash_path("state.json"), {"relay1": "on"})

    wdm.heartbeat(server.send, persist=persist)

    async def main():
        for _ in range(10):
            await wdm.beat()

    e = fwtest.raises(sim.SimulatedReset, fwtest.run, main())
    assert e.cause == "hard" and order == ["persist"]
    b.boot()
    rep = WatchdogManager().boot_report()
    assert rep == {"reset_cause": "hard", "detail": {"reason": "heartbeat", "missed": 10}}
    assert fsutil.read_json(hal.flash_path("state.json")) == {"relay1": "on"}
    _done()


def test_heartbeat_loop_runs_supervised_at_its_interval():
    b, wdm, _ = _setup()
    server = _Server([])
    wdm.heartbeat(server.send)

    async def main():
        t = asyncio.create_task(wdm.run())
        await b.run_for(35000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert [body["seq"] for body in server.bodies] == [1, 2, 3, 4]
    assert [body["uptime"] for body in server.bodies] == [0, 10, 20, 30]
    assert wdm.acks == 4 and wdm.missed == 0
    # the answers were handed to on_answer, not kept: a dict per heartbeat held on the heap for nothing
    assert not [k for k, v in wdm.__dict__.items() if isinstance(v, dict) and "ack" in v]
    st = wdm.stats()
    assert st["tasks"]["heartbeat"]["critical"] and st["heartbeat"]["seq"] == 4
    _done()


def test_heartbeat_window_follows_the_interval():
    b, wdm, _ = _setup()
    wdm.heartbeat(_Server([]).send)
    assert wdm._tasks["heartbeat"].window_ms == 40000
    wdm.set_heartbeat_interval(60000, timeout_ms=30000)
    assert wdm._tasks["heartbeat"].window_ms == 180000 and wdm.heartbeat_interval_ms == 60000
    _done()


def test_escalation_reconnects_the_network_manager():
    from iotlib.net import NetworkManager
    b, wdm, _ = _setup()
    nm = NetworkManager("lab", "pw", sleep_ms=b.vsleep)
    nm.check_ms = 1
    server = _Server([], default=OSError(113))
    wdm.heartbeat(server.send, reconnect=nm.reconnect)

    async def main():
        t = asyncio.create_task(nm.run())
        await b.run_for(1000)
        assert nm.is_up
        for _ in range(3):
            await wdm.beat()
        await b.run_for(1000)
        t.cancel()
        await asyncio.sleep(0)

    fwtest.run(main())
    assert nm.reconnects == 1 and nm.drops == 1 and b.wlan.connects == ["lab", "lab"]
    _done()


def test_heartbeat_over_real_http_through_link_death_and_a_lost_server():
    # The pieces a controller wires together: NetworkManager, HTTPClient, a heartbeat peer on 127.0.0.1.
    import peers
    from iotlib.http import HTTPClient
    from iotlib.net import NetworkManager
    b, wdm, lines = _setup()

    async def quick(ms):
        await asyncio.sleep(0)

    nm = NetworkManager("lab", "pw", sleep_ms=quick)
    nm.check_ms = 1
    http = HTTPClient(timeout_ms=3000)
    url = [None]
    apps = []
    steps = []

    def hb(method, path, headers, body):
        return 200, {"ack": body["seq"], "server_time": 1795000000000, "ttl": 35,
                     "pending": {"config_version": 1, "state_version": 0, "ota": None}}

    async def send(body):
        try:
            hal.link_check()
            r = await http.request("POST", url[0], json=body)
        except Exception:
            nm.io_failed()
            raise
        nm.io_ok()
        if r.status != 200:
            raise OSError("heartbeat answered %d" % r.status)
        return r.json()

    async def new_server():
        app = peers.App(hb)
        url[0] = await app.start() + "/api/v1/devices/relay-1/heartbeat"
        apps.append(app)

    def reconnect():
        steps.append("reconnect")
        nm.reconnect()

    async def reregister():  # registration hands out the heartbeat URL: the service has moved
        steps.append("reregister")
        await new_server()

    wdm.heartbeat(send, reconnect=reconnect, reregister=reregister,
                  payload=lambda: {"rssi": nm.rssi, "reconnects": nm.reconnects})

    async def until(cond):
        for _ in range(3000):
            if cond():
                return True
            await asyncio.sleep(0.001)
        return False

    async def main():
        await new_server()
        t = asyncio.create_task(nm.run())
        assert await until(lambda: nm.is_up)
        assert await wdm.beat()
        b.wlan.kill_link()  # silent: only the heartbeats notice
        for _ in range(3):
            assert not await wdm.beat()
        assert nm.link_deaths == 1
        assert await until(lambda: nm.is_up)
        assert await wdm.beat()  # over the healed link
        await apps[0].stop()  # the control plane goes away
        for _ in range(5):
            assert not await wdm.beat()
        assert await until(lambda: nm.is_up)
        assert await wdm.beat()  # at the address re-registration gave
        t.cancel()
        for app in apps[1:]:
            await app.stop()

    fwtest.run(main())
    assert [log[3]["seq"] for log in apps[0].log] == [1, 5]
    assert [log[3]["seq"] for log in apps[1].log] == [11]
    assert apps[0].log[0][3]["rssi"] == -58 and apps[1].log[0][3]["reconnects"] >= 1
    assert steps == ["reconnect", "reconnect", "reregister"]
    assert wdm.missed == 0 and wdm.acks == 3 and wdm.missed_total == 8
    _done()


def test_long_poll_heartbeats_are_paced_by_the_answers():
    """With heartbeat_hold_ms the heartbeat is a long-poll: the next one goes at once after news, a poll given up or
    one the server held; an answer that came at once with nothing new backs off (2 s, 4 s, … up to the interval:
    a server that does not hold, or one draining for a shutdown, so the poll moves on to another replica); a failure
    backs off
    (2 s, 4 s, … jittered to half..1.5 of it) and never retries before the server's Retry-After."""
    b = sim.configure(flash_root=fwtest.tmpdir("flash"), clock="manual")
    sleeps = []

    class Stop(Exception):
        pass

    async def sleep(ms):
        sleeps.append(ms)
        if len(script) == 0:
            raise Stop()

    wd = WatchdogManager(sleep_ms=sleep)
    wd.heartbeat_interval_ms = 10000
    wd.heartbeat_hold_ms = 10000
    # each step: (ms the server holds the request, answer or an exception, news)
    script = [(10000, True, False), (5, True, True), (5, True, False), (0, OSError("down"), False),
              (0, OSError("down"), False), (0, "503", False), (9000, True, False)]
    script_copy = list(script)
    order = []

    async def send(body):
        held, outcome, news = script.pop(0)
        b.advance(held)
        order.append(len(sleeps))
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == "503":
            wd.retry_after_ms = 20000
            raise OSError("heartbeat: HTTP 503")
        wd.again = news
        return {"ack": body["seq"]}

    wd.supervise("heartbeat", wd._heartbeat_loop, critical=False)  # registered, not started: the loop runs below
    wd._send = send
    wd._payload = None
    wd._on_answer = None
    wd._steps = {}
    wd.missed_reconnect = wd.missed_reregister = 99
    wd.missed_reset = None
    try:
        fwtest.run(wd._heartbeat_loop())
    except Stop:
        pass
    assert len(script_copy) == 7 and not script
    # held 10 s: at once; news: at once; at once without news: a short backoff; held 9 s: at once
    assert order == [0, 0, 0, 1, 2, 3, 4], (order, sleeps)
    assert 1000 <= sleeps[0] <= 3000, sleeps   # answered at once, nothing new (a draining server): 2 s, jittered
    assert 1000 <= sleeps[1] <= 3000, sleeps   # first failure: 2 s, jittered
    assert 2000 <= sleeps[2] <= 6000, sleeps   # second: 4 s
    assert sleeps[3] >= 20000, sleeps          # the server's Retry-After
