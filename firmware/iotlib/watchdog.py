# Supervision: restarts crashed tasks with backoff and reports them; feeds the hardware watchdog only while every
# critical task has checked in within its window (so a hung task resets the board instead of leaving it half alive);
# sends heartbeats and escalates missed answers: reconnect -> re-register -> persist state and reset.
# The alarm manager, the network, the auth client and the state store are reached only through injected callbacks.
from iotlib import hal, log, fsutil
from iotlib.compat import asyncio, sleep_ms, ticks_diff, urandom, mem_free

_log = log.get("watchdog")

_DETAIL_FILE = ".reset_detail"  # why iotlib is about to let the board reset; read by the next boot's boot_report()


class _Task:
    def __init__(self, name, fn, critical, window_ms, now):
        self.name = name
        self.fn = fn
        self.critical = critical
        self.window_ms = window_ms
        self.last = now         # last check-in (a (re)start counts as one)
        self.started = now
        self.state = "new"      # new | running | backoff | done
        self.crashes = 0
        self.streak = 0         # crashes in a row without a stable run in between
        self.task = None


class WatchdogManager:
    #: Hardware WDT timeout; the RP2040 allows at most 8388 ms (hal.WDT_MAX_MS).
    wdt_timeout_ms = 8000
    #: Period of run()'s supervision tick (feed + check-in audit): well inside the WDT timeout.
    tick_ms = 1000
    #: Default check-in window of a critical task (supervise(window_ms=...) overrides it per task).
    window_ms = 30000
    #: Restart delay after a crash: doubles per crash in a row (jittered to half..all), up to restart_max_ms.
    restart_base_ms = 500
    restart_max_ms = 30000
    #: A task that ran this long before crashing starts its backoff afresh.
    stable_ms = 60000
    #: Heartbeat period, and how long one heartbeat may wait for its answer before it counts as missed.
    heartbeat_interval_ms = 10000
    heartbeat_timeout_ms = 10000
    #: ms the control plane may hold a heartbeat as a long-poll (docs/protocol.md §5); 0: plain heartbeats. A held
    #: heartbeat is the pause itself: the next one starts when it ends, or one interval after it started.
    heartbeat_hold_ms = 0
    #: Longest pause (ms, before jitter) after failed heartbeats, however long the interval: with long-polls the
    #: heartbeat is how changes arrive, so a long interval must not keep a device deaf for as long.
    retry_cap_ms = 60000
    #: Consecutive missed heartbeats at which each escalation step runs (once per episode). missed_reset = None never
    #: resets: the ladder then repeats reconnect/re-register every missed_reregister misses (degraded mode for ever).
    missed_reconnect = 3
    missed_reregister = 5
    missed_reset = 10

    def __init__(self, wdt_timeout_ms=None, on_crash=None, wdt=None, sleep_ms=None):
        if wdt_timeout_ms is not None:
            self.wdt_timeout_ms = wdt_timeout_ms
        if not 0 < self.wdt_timeout_ms <= hal.WDT_MAX_MS:
            raise ValueError("wdt_timeout_ms must be 1..%d (RP2040 maximum), got %r"
                             % (hal.WDT_MAX_MS, self.wdt_timeout_ms))
        self._on_crash = on_crash
        self._wdt = wdt
        self._sleep_ms = sleep_ms or _default_sleep
        self._tasks = {}
        self._running = False
        self._t0 = hal.ticks_ms()
        self.feeds = 0
        self.starving = None    # name of the critical task that stopped the feeding, or None
        self._boot = None
        # heartbeat
        self._send = None
        self._payload = None
        self._on_answer = None
        self._steps = {}
        self.seq = 0
        self.acks = 0
        self.missed = 0         # in a row
        self.missed_total = 0
        self.again = False      # send the next heartbeat at once (the answer brought news, the poll gave way)
        self._quick = 0         # long-polls in a row answered at once with nothing new
        self.retry_after_ms = 0  # the server's Retry-After on its last refusal

    # ---- supervised tasks ----
    def supervise(self, name, coro_fn, critical=True, window_ms=None):
        """Run `await coro_fn()` as a supervised task: restarted with backoff when it raises (and reported through
        on_crash(name, exc)); a critical task must call checkin(name) at least every window_ms or the hardware
        watchdog goes unfed. A task that returns is finished and no longer audited."""
        if name in self._tasks:
            raise ValueError("task %r is already supervised" % (name,))
        t = _Task(name, coro_fn, critical, window_ms or self.window_ms, hal.ticks_ms())
        self._tasks[name] = t
        if self._running:
            self._spawn(t)

    def checkin(self, name):
        """The task `name` is alive and making progress."""
        t = self._tasks.get(name)
        if t is None:
            raise KeyError("checkin from unsupervised task %r" % (name,))
        t.last = hal.ticks_ms()

    def _spawn(self, t):
        t.task = asyncio.create_task(self._keep(t))

    def restart_delay_ms(self, streak):
        n = streak - 1 if streak > 0 else 0
        d = self.restart_max_ms if n >= 20 else min(self.restart_max_ms, self.restart_base_ms << n)
        r = urandom(1)[0]
        return d // 2 + r * (d - d // 2) // 255

    async def _keep(self, t):
        while True:
            t.started = t.last = hal.ticks_ms()
            t.state = "running"
            try:
                await t.fn()
                t.state = "done"
                _log.info("task finished", task=t.name)
                return
            except Exception as e:  # CancelledError is a BaseException on both runtimes: stop() gets through
                ran = ticks_diff(hal.ticks_ms(), t.started)
                t.crashes += 1
                t.streak = 1 if ran >= self.stable_ms else t.streak + 1
                delay = self.restart_delay_ms(t.streak)
                _log.exc("task crashed", e, task=t.name, crashes=t.crashes, in_a_row=t.streak, restart_in_ms=delay)
                self._report(t.name, e)
                t.state = "backoff"
            await self._sleep_ms(delay)

    def _report(self, name, exc):
        if self._on_crash is None:
            return
        try:
            r = self._on_crash(name, exc)
            if hasattr(r, "send"):
                asyncio.create_task(r)
        except Exception as e:
            _log.exc("on_crash callback failed", e, task=name)

    # ---- the hardware watchdog ----
    def start(self):
        """Start the hardware WDT (irreversible on a board: from here on it must be fed)."""
        if self._wdt is None:
            self._wdt = hal.WDT(timeout=self.wdt_timeout_ms)
            _log.info("hardware watchdog started", timeout_ms=self.wdt_timeout_ms)
        return self._wdt

    def stale(self):
        """The first critical, unfinished task past its check-in window, as (name, ms since its check-in), or None."""
        now = hal.ticks_ms()
        for t in self._tasks.values():
            if t.critical and t.state != "done":
                late = ticks_diff(now, t.last)
                if late > t.window_ms:
                    return t.name, late
        return None

    def tick(self):
        """One supervision step: feed the WDT if every critical task is fresh, else let it starve (once the board
        resets, boot_report() will name the task). run() calls this every tick_ms."""
        wdt = self.start()
        s = self.stale()
        if s is None:
            if self.starving is not None:
                _log.warning("critical tasks checking in again; watchdog fed", task=self.starving)
                self.starving = None
                fsutil.remove(hal.flash_path(_DETAIL_FILE))
            wdt.feed()
            self.feeds += 1
        elif self.starving != s[0]:
            self.starving = s[0]
            _log.critical("critical task missed its check-in window: watchdog no longer fed, the board will reset",
                          task=s[0], since_checkin_ms=s[1], window_ms=self._tasks[s[0]].window_ms)
            _note_reset({"reason": "task_stalled", "task": s[0], "since_checkin_ms": s[1]})
        check = getattr(wdt, "check", None)  # the simulated WDT has no interrupt of its own
        if check is not None:
            check()

    async def run(self):
        """Start the WDT and every supervised task, then tick for ever (cancel to stop the tasks too)."""
        self.boot_report()
        self.start()
        self._running = True
        for t in self._tasks.values():
            if t.task is None:
                self._spawn(t)
        try:
            while True:
                self.tick()
                await self._sleep_ms(self.tick_ms)
        finally:
            self._running = False
            self.stop()

    def stop(self):
        """Cancel every supervised task (the WDT, if started, keeps running: hardware cannot stop it)."""
        for t in self._tasks.values():
            if t.task is not None:
                t.task.cancel()
                t.task = None

    # ---- heartbeat ----
    def heartbeat(self, send, payload=None, on_answer=None, reconnect=None, reregister=None, persist=None,
                  reset=None, critical=True):
        """Send heartbeats as the supervised task "heartbeat". `await send(body)` returns the answer dict (and
        raises on failure); body = {seq, uptime, mem_free} + payload(). An answer counts when its "ack" is our seq;
        it goes to on_answer(answer) (e.g. to act on "pending"). Missed answers in a row escalate through the
        injected async callbacks: reconnect() at missed_reconnect, reregister() at missed_reregister, then
        persist() and reset() at missed_reset (reset defaults to hal.reset())."""
        self._send = send
        self._payload = payload
        self._on_answer = on_answer
        self._steps = {"reconnect": reconnect, "reregister": reregister, "persist": persist,
                       "reset": reset or _hal_reset}
        self.supervise("heartbeat", self._heartbeat_loop, critical=critical)
        self.set_heartbeat_interval(self.heartbeat_interval_ms)

    def set_heartbeat_interval(self, interval_ms, timeout_ms=None):
        """Change the heartbeat period (e.g. to the interval the registration answer gives), keeping the heartbeat
        task's check-in window in step with it."""
        self.heartbeat_interval_ms = interval_ms
        if timeout_ms is not None:
            self.heartbeat_timeout_ms = timeout_ms
        t = self._tasks.get("heartbeat")
        if t is not None:
            t.window_ms = max(2 * (self.heartbeat_interval_ms + self.heartbeat_timeout_ms), self.window_ms)

    async def _heartbeat_loop(self):
        while True:
            self.checkin("heartbeat")
            t0 = hal.ticks_ms()
            ok = await self.beat()
            self.checkin("heartbeat")
            iv = self.heartbeat_interval_ms
            r = urandom(1)[0]
            if ok and self.heartbeat_hold_ms:
                held = ticks_diff(hal.ticks_ms(), t0)
                # next poll at once after news, a poll given up, or one the server held (it may cap the hold below
                # ours); answers that come at once with nothing new (a server that does not hold, one draining for
                # a shutdown) back off 2 s, 4 s, … up to the interval, jittered
                if self.again or held >= min(self.heartbeat_hold_ms, 1000):
                    self.again = False
                    self._quick = 0
                    continue
                self._quick += 1
                b = min(iv, 1000 << (self._quick if self._quick < 7 else 7))
                delay = b // 2 + r * b // 255
            elif ok:
                delay = iv
            else:
                # a failed heartbeat: min(interval, retry_cap_ms), with long-polls a capped exponential backoff
                # (2 s, 4 s, … up to that), each spread over half..1.5 of it, because a whole fleet fails together
                # when the server goes away; never before the server's Retry-After
                b = min(iv, self.retry_cap_ms)
                if self.heartbeat_hold_ms:  # the poll is how changes arrive: come back soon after a short outage
                    b = min(b, 1000 << (self.missed if self.missed < 7 else 7))
                delay = b // 2 + r * b // 255
                if delay < self.retry_after_ms:
                    delay = self.retry_after_ms + r * iv // 510
                self.retry_after_ms = 0
            if delay > 0:
                await self._sleep_ms(delay)

    def uptime_s(self):
        return ticks_diff(hal.ticks_ms(), self._t0) // 1000

    async def beat(self):
        """Send one heartbeat; True when acknowledged. A miss runs the escalation step due at its count."""
        self.seq += 1
        seq = self.seq
        free = mem_free()
        # -1 = no GC heap to measure (CPython): null, not a byte count the control plane refuses (protocol §5)
        body = {"seq": seq, "uptime": self.uptime_s(), "mem_free": free if free >= 0 else None}
        if self._payload is not None:
            body.update(self._payload())
        answer = None
        try:
            answer = await asyncio.wait_for(self._send(body),
                                            (self.heartbeat_timeout_ms + self.heartbeat_hold_ms) / 1000)
            ok = isinstance(answer, dict) and answer.get("ack") == seq
            if not ok:
                _log.warning("heartbeat answer without our ack", seq=seq, answer=answer)
        except Exception as e:  # the send failed or timed out (a cancel is a BaseException and passes)
            ok = False
            _log.warning("heartbeat failed", seq=seq, error=log.exc_summary(e), missed=self.missed + 1)
        if ok:
            if self.missed:
                _log.info("heartbeat answered again", seq=seq, after_missed=self.missed)
            self.missed = 0
            self.acks += 1
            if self._on_answer is not None:
                try:
                    r = self._on_answer(answer)
                    if hasattr(r, "send"):
                        await r
                except Exception as e:
                    _log.exc("heartbeat on_answer failed", e)
            return True
        self.missed += 1
        self.missed_total += 1
        await self._escalate(self.missed)
        return False

    async def _escalate(self, missed):
        k = missed
        if self.missed_reset is None and self.missed_reregister:
            k = (missed - 1) % self.missed_reregister + 1
        if k == self.missed_reconnect:
            await self._step("reconnect", missed)
        if k == self.missed_reregister:
            await self._step("reregister", missed)
        if self.missed_reset is not None and k == self.missed_reset:
            _note_reset({"reason": "heartbeat", "missed": missed})
            await self._step("persist", missed)
            _log.critical("heartbeat escalation: resetting", missed=missed)
            await self._step("reset", missed)

    async def _step(self, name, missed):
        cb = self._steps.get(name)
        if cb is None:
            return
        _log.warning("heartbeat escalation", step=name, missed=missed)
        try:
            r = cb()
            if hasattr(r, "send"):
                await r
        except Exception as e:  # a failed step must not stop the ladder (the reset still has to come)
            _log.exc("heartbeat escalation step failed", e, step=name)

    # ---- reporting ----
    def boot_report(self):
        """Why this boot happened: {"reset_cause": hal.reset_cause(), "detail": {...}?} where detail is what iotlib
        recorded before letting the board reset (a stalled task, missed heartbeats). Logged once per boot."""
        if self._boot is None:
            cause = hal.reset_cause()
            rep = {"reset_cause": cause}
            path = hal.flash_path(_DETAIL_FILE)
            detail = fsutil.read_json(path)
            if detail is not None:
                fsutil.remove(path)
                if cause != "power_on":  # a power cycle interrupted whatever was pending
                    rep["detail"] = detail
            if cause in ("watchdog", "unknown") or "detail" in rep:
                _log.warning("boot after reset", **rep)
            else:
                _log.info("boot", **rep)
            self._boot = rep
        return self._boot

    def stats(self):
        now = hal.ticks_ms()
        tasks = {}
        for t in self._tasks.values():
            tasks[t.name] = {"state": t.state, "critical": t.critical, "crashes": t.crashes,
                             "since_checkin_ms": ticks_diff(now, t.last)}
        return {"tasks": tasks, "feeds": self.feeds, "starving": self.starving, "uptime_s": self.uptime_s(),
                "heartbeat": {"seq": self.seq, "acks": self.acks, "missed": self.missed,
                              "missed_total": self.missed_total}}


def _note_reset(detail):
    try:
        fsutil.write_json_atomic(hal.flash_path(_DETAIL_FILE), detail)
    except OSError:
        pass  # a full flash must not stop the reset


async def _hal_reset():
    hal.reset()


def _default_sleep(ms):
    return sleep_ms(ms)
