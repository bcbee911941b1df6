# Device alarms: fire/clear deduplicated by key (count, first/last timestamp, severity), held in a bounded buffer while
# the control plane is unreachable, delivered in batches with capped exponential backoff (docs/protocol.md section 6),
# critical ones persisted across a reset. Nothing here raises into the caller for a runtime failure: alarms are
# raised from error paths, and an error path must not fail again.
from .compat import const, epoch_ms, ticks_ms, ticks_diff, ticks_add, sleep_ms, urandom, memory_error
from . import fsutil
from . import log

_log = log.get("alarms")

SEVERITIES = ("info", "warning", "error", "critical")
#: 2022-01-01 in epoch ms: a board's RTC starts at 2021-01-01, so an earlier timestamp was taken before any time sync
_SYNCED_AFTER_MS = const(1640995200000)
# A severity's log level is log.INFO + 10 * its index in SEVERITIES (info 20 ... critical 50): no table in RAM.


class _Alarm:
    def __init__(self, key, severity, message, ts):
        self.key = key
        self.severity = severity
        self.message = message
        self.count = 1
        self.first_ts = ts
        self.last_ts = ts
        self.state = "firing"
        self.rev = 1  # bumped on every change
        self.sent_rev = 0  # the rev the control plane has acknowledged
        self.seq = 0  # order of last change, for eviction

    def wire(self):
        return {"key": self.key, "severity": self.severity, "message": self.message, "count": self.count,
                "first_ts": self.first_ts, "last_ts": self.last_ts, "state": self.state}

    def pending(self):
        return self.rev != self.sent_rev


class AlarmManager:
    #: Most alarms held at once (firing, or changed and not yet delivered). When a new key arrives at capacity, an
    #: already-delivered alarm makes room first, then the oldest undelivered non-critical one (counted in
    #: `dropped`), and a critical one only when nothing else is left.
    capacity = 32
    #: Alarms per POST: bounds the request body (about 250 bytes each) on a heap shared with TLS.
    BATCH = 8
    #: Longest message kept (characters); report_exception allows MAX_TRACEBACK more for the traceback.
    MAX_MESSAGE = 200
    #: Longest traceback tail kept by report_exception (characters).
    MAX_TRACEBACK = 600
    #: Longest alarm key (keys are names like "sensor.bme280", not data).
    MAX_KEY = 64
    #: First retry delay after a failed delivery (ms); doubles per failure up to BACKOFF_MAX_MS, with jitter.
    BACKOFF_MIN_MS = 2000
    #: Longest retry delay (ms): a device offline for hours still retries every few minutes.
    BACKOFF_MAX_MS = 300000
    #: Period of run()'s delivery loop (ms) when nothing is failing.
    FLUSH_INTERVAL_MS = 5000
    #: The persisted file's name inside the flash directory given as `path`.
    FILE = "alarms.json"

    def __init__(self, path=None, capacity=None, clock=None):
        """path: a flash directory for the critical alarms file (None: nothing persisted)."""
        if capacity is not None:
            if capacity < 1:
                raise ValueError("capacity must be >= 1")
            self.capacity = capacity
        self.clock = clock or epoch_ms
        self.file = None if path is None else path.rstrip("/") + "/" + self.FILE
        self._alarms = {}
        self._seq = 0
        self.dropped = 0
        self.sent = 0
        self.failures = 0  # consecutive delivery failures
        self.persist_errors = 0
        self.backoff_ms = 0
        self.last_error = None
        self._retry_at = None
        self._persist_due = False
        if self.file is not None:
            try:
                fsutil.makedirs(path.rstrip("/"))
            except OSError as e:
                _log.error("alarm directory unusable", path=path, reason=str(e))
            self._reload()

    # -- raising and clearing ----------------------------------------------------------------------------------

    def fire(self, key, severity, message):
        """Raise (or re-raise) the alarm `key`. A firing alarm counts repeats; a resolved one starts a new episode.
        Returns the alarm's count."""
        key = str(key)[:self.MAX_KEY]
        if severity not in SEVERITIES:
            _log.warning("unknown alarm severity, using error", alarm=key, severity=str(severity))
            severity = "error"
        message = log.mask(message if isinstance(message, str) else str(message))
        return self._fire(key, severity, message[:self.MAX_MESSAGE])

    def clock_stepped(self, offset_ms):
        """The first time sync stepped the clock by offset_ms: the timestamps taken before it (dated before 2022: the
        RTC's power-on date) move with it — the RTC ran on in the same boot, so raw + step is the true time."""
        for a in self._alarms.values():
            if a.first_ts < _SYNCED_AFTER_MS:
                a.first_ts += offset_ms
            if a.last_ts < _SYNCED_AFTER_MS:
                a.last_ts += offset_ms

    def _fire(self, key, severity, message):
        now = self.clock()
        a = self._alarms.get(key)
        persist_now = severity == "critical"
        if a is None:
            self._make_room()
            a = self._alarms[key] = _Alarm(key, severity, message, now)
        elif a.state == "resolved":
            persist_now = persist_now or a.severity == "critical"
            a.state, a.count, a.first_ts, a.last_ts = "firing", 1, now, now
            a.severity, a.message = severity, message
        else:
            persist_now = (severity == "critical") != (a.severity == "critical")
            if a.severity == "critical" or severity == "critical":
                self._persist_due = True  # a repeat: written at the next flush, not on every repeat (flash wear)
            a.count += 1
            a.last_ts = now
            a.severity, a.message = severity, message
        if a.count == 1:  # a new episode (a repeat only counts)
            _log.log(log.INFO + 10 * SEVERITIES.index(severity), "alarm", alarm=key, severity=severity, message=message)
        self._touch(a)
        if persist_now:
            self._persist()
        return a.count

    def clear(self, key):
        """Resolve a firing alarm (delivered as state "resolved", then forgotten). False if it was not firing."""
        a = self._alarms.get(str(key)[:self.MAX_KEY])
        if a is None or a.state != "firing":
            return False
        a.state = "resolved"
        a.last_ts = self.clock()
        self._touch(a)
        _log.info("alarm resolved", alarm=a.key)
        if a.severity == "critical":
            self._persist()
        return True

    def report_exception(self, key, exc, severity="error"):
        """An alarm for an unhandled task exception: its type and message, then the tail of its traceback (masked,
        at most MAX_TRACEBACK characters)."""
        try:
            head = log.mask(log.exc_summary(exc))[:self.MAX_MESSAGE]
            tb = log.traceback_tail(exc, self.MAX_TRACEBACK)
            message = head + "\n" + tb
        except Exception:  # a broken __str__ must not break the error path
            message = type(exc).__name__
        _log.exc("task failed", exc, alarm=str(key))
        if severity not in SEVERITIES:
            severity = "error"
        return self._fire(str(key)[:self.MAX_KEY], severity, message)

    def _touch(self, a):
        self._seq += 1
        a.seq = self._seq
        a.rev += 1

    def _make_room(self):
        if len(self._alarms) < self.capacity:
            return
        victim = None
        rank = None
        for a in self._alarms.values():
            r = (0 if not a.pending() else 1 if a.severity != "critical" else 2, a.seq)
            if rank is None or r < rank:
                victim, rank = a, r
        del self._alarms[victim.key]
        if victim.pending():
            self.dropped += 1
            _log.warning("alarm buffer full, dropped", alarm=victim.key, severity=victim.severity)
        if victim.severity == "critical":
            self._persist()

    # -- reading -----------------------------------------------------------------------------------------------

    def get(self, key):
        a = self._alarms.get(key)
        return None if a is None else a.wire()

    def alarms(self):
        return [a.wire() for a in sorted(self._alarms.values(), key=lambda a: a.seq)]

    def pending(self):
        return sum(1 for a in self._alarms.values() if a.pending())

    def firing(self):
        return sum(1 for a in self._alarms.values() if a.state == "firing")

    def retry_in_ms(self):
        """Milliseconds until the backoff lets flush() try again (0: now)."""
        if self._retry_at is None:
            return 0
        return max(0, ticks_diff(self._retry_at, ticks_ms()))

    def stats(self):
        return {"held": len(self._alarms), "firing": self.firing(), "pending": self.pending(),
                "dropped": self.dropped, "sent": self.sent, "failures": self.failures,
                "persist_errors": self.persist_errors}

    # -- delivery ----------------------------------------------------------------------------------------------

    async def flush(self, http, url, token, force=False):
        """POST every pending alarm to `url` in batches of BATCH. True when nothing is left pending. On any failure
        (transport error, non-2xx answer) everything is kept and the next attempt waits for the backoff, which
        flush() honours unless force is set."""
        if not force and self.retry_in_ms() > 0:
            return False
        if self._persist_due:
            self._persist()
        headers = {"Authorization": "Bearer " + token}
        for _ in range(self.capacity // self.BATCH + 2):  # bounded: alarms fired meanwhile wait for the next call
            batch = sorted((a for a in self._alarms.values() if a.pending()),
                           key=lambda a: (a.severity != "critical", a.seq))[:self.BATCH]
            if not batch:
                break
            sent = [(a, a.rev) for a in batch]
            try:
                resp = await http.request("POST", url, json={"alarms": [a.wire() for a in batch]}, headers=headers)
                problem = None if 200 <= resp.status < 300 else "HTTP %d" % resp.status
            except Exception as e:  # HTTPError and anything else the transport throws
                if isinstance(e, MemoryError):
                    memory_error("alarms")
                problem = log.exc_summary(e)
            if problem is not None:
                self._failed(problem)
                return False
            removed_critical = False
            for a, rev in sent:
                a.sent_rev = rev
                if a.state == "resolved" and not a.pending() and self._alarms.get(a.key) is a:
                    del self._alarms[a.key]
                    removed_critical = removed_critical or a.severity == "critical"
            self.sent += len(sent)
            if removed_critical:
                self._persist()
        self.failures = 0
        self.backoff_ms = 0
        self._retry_at = None
        self.last_error = None
        return self.pending() == 0

    def _failed(self, problem):
        self.failures += 1
        self.last_error = problem
        b = self.BACKOFF_MIN_MS
        for _ in range(self.failures - 1):
            b *= 2
            if b >= self.BACKOFF_MAX_MS:
                b = self.BACKOFF_MAX_MS
                break
        self.backoff_ms = b
        r = urandom(2)
        delay = b // 2 + ((r[0] << 8) | r[1]) % (b // 2 + 1)  # jitter: [b/2, b], so a fleet does not retry in step
        self._retry_at = ticks_add(ticks_ms(), delay)
        _log.warning("alarm delivery failed", reason=problem, pending=self.pending(), retry_ms=delay)

    async def run(self, http, target, interval_ms=None):
        """Deliver forever. target() gives (url, token), or None while the device is not registered."""
        interval = interval_ms or self.FLUSH_INTERVAL_MS
        while True:
            t = target()
            if t is not None and self.pending():
                try:
                    await self.flush(http, t[0], t[1])
                except MemoryError:  # building a batch: every alarm is kept, the next attempt backs off
                    memory_error("alarms")
                    self._failed("MemoryError")
            wait = self.retry_in_ms()
            await sleep_ms(wait if 0 < wait < interval else interval)

    # -- persistence of critical alarms --------------------------------------------------------------------------

    def _persist(self):
        self._persist_due = False
        if self.file is None:
            return
        crit = [a.wire() for a in self._alarms.values() if a.severity == "critical"]
        try:
            if crit:
                fsutil.write_json_atomic(self.file, {"alarms": crit})
            else:
                fsutil.remove(self.file)
        except OSError as e:
            self.persist_errors += 1
            self._persist_due = True  # try again at the next flush
            _log.error("cannot persist critical alarms", reason=log.exc_summary(e))

    def _reload(self):
        if not fsutil.exists(self.file):
            return
        doc = fsutil.read_json(self.file)
        items = doc.get("alarms") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            _log.error("critical alarms file corrupt, ignored", path=self.file)
            return
        bad = 0
        for it in items:
            if not self._restore(it):
                bad += 1
        if bad:
            _log.error("critical alarms file had bad entries", path=self.file, bad=bad)

    def _restore(self, it):
        try:
            key, sev, state = it["key"], it["severity"], it["state"]
            count, first, last = it["count"], it["first_ts"], it["last_ts"]
            ok = (isinstance(key, str) and key and sev in SEVERITIES and state in ("firing", "resolved")
                  and isinstance(count, int) and count > 0 and isinstance(first, int) and isinstance(last, int))
        except (KeyError, TypeError):
            ok = False
        if not ok or len(self._alarms) >= self.capacity:
            return False
        a = _Alarm(key[:self.MAX_KEY], sev, str(it.get("message", ""))[:self.MAX_MESSAGE], first)
        a.count, a.last_ts, a.state = count, last, state
        self._touch(a)  # pending again: the control plane dedups a re-send (it keeps max(count))
        self._alarms[a.key] = a
        return True
