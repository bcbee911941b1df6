# Wi-Fi supervision for the Pico W (cyw43): connect with capped exponential backoff + jitter, a log line for every
# link status, reconnect on drop, and link-death detection beyond isconnected() — a cyw43 link can die silently while
# isconnected() stays True (micropython#16290), so callers report their failed I/O and enough of it in a row counts
# as a dead link.
from iotlib import hal, log
from iotlib.compat import asyncio, sleep_ms, ticks_diff, urandom

_log = log.get("net")

# cyw43 status code c (-3..3) -> short name for logs and stats _NAMES[c + 3], what it means for the operator
# _MEANINGS[c + 3] (two constant tuples cost less heap than a dict of pairs)
_NAMES = ("wrong_password", "no_ap_found", "connect_fail", "idle", "joining", "no_ip", "up")
_MEANINGS = ("authentication failed: check the Wi-Fi password", "access point not found: SSID wrong or out of range",
             "connection failed", "link down", "joining the access point", "joined, waiting for a DHCP address",
             "connected with an address")


def _pick(table, code, default):
    return table[code + 3] if isinstance(code, int) and -3 <= code <= 3 else default


def _meaning(code, default):
    return _pick(_MEANINGS, code, default)


def status_name(code):
    return _pick(_NAMES, code, None) or "unknown_%s" % (code,)


class NetworkManager:
    #: First retry delay after a failed attempt; doubles per consecutive failure up to backoff_max_ms. Each delay
    #: is jittered to between half and all of it, so a fleet that lost the same AP does not come back in lockstep.
    backoff_base_ms = 1000
    backoff_max_ms = 60000
    #: One attempt's budget: a Pico W joins in 2-5 s, DHCP on a busy network can take several more.
    connect_timeout_ms = 20000
    #: How often status() is polled during an attempt.
    poll_ms = 250
    #: How often run() looks at a link that is up (a failed I/O wakes it sooner).
    check_ms = 2000
    #: Consecutive failed I/Os (io_failed()) after which a link that still claims to be up is taken as dead.
    dead_after = 3
    #: cyw43 power management off (network.WLAN.PM_NONE): the default power save drops and delays packets.
    power_mode = 0xA11140

    def __init__(self, ssid, password, wlan=None, sleep_ms=None, networks=None):
        """networks: more (ssid, password) pairs; a failed attempt moves on to the next network, in order."""
        self.ssid = ssid
        self._password = password  # never logged, never in stats()
        self._nets = [(ssid, password)] + [tuple(n) for n in networks or () if tuple(n) != (ssid, password)]
        self._wlan = wlan
        self._sleep_ms = sleep_ms or _default_sleep
        self._cbs = []
        self._wake = None
        self.is_up = False
        self.status = 0
        self.rssi = None
        self.ip = None
        self.attempts = 0       # connect attempts made
        self.failures = 0       # failed attempts, in all
        self._streak = 0        # failed attempts since the link was last up
        self.connects = 0       # times the link came up
        self.reconnects = 0     # ... after the first time
        self.drops = 0          # times an up link went down (seen by status, or declared dead)
        self.link_deaths = 0    # ... of which were silent deaths found through failed I/O
        self.io_failures = 0    # consecutive failed I/Os on the current link
        self._up_since = None
        self._up_total_ms = 0

    @property
    def wlan(self):
        if self._wlan is None:
            self._wlan = hal.WLAN(hal.STA_IF)
        return self._wlan

    # ---- events ----
    def on_change(self, cb):
        """cb(up) is called with True when the link comes up and False when it goes down (a coroutine function's
        coroutine is scheduled as a task). An exception in cb is logged, never raised into the manager."""
        self._cbs.append(cb)

    def _emit(self, up):
        for cb in self._cbs:
            try:
                r = cb(up)
                if hasattr(r, "send"):
                    asyncio.create_task(r)
            except Exception as e:
                _log.exc("on_change callback failed", e)

    # ---- connecting ----
    def backoff_ms(self, failures):
        """The jittered delay before the next attempt after `failures` consecutive failures."""
        n = failures - 1 if failures > 0 else 0
        d = self.backoff_max_ms if n >= 20 else min(self.backoff_max_ms, self.backoff_base_ms << n)
        r = urandom(2)
        return d // 2 + ((r[0] << 8) | r[1]) * (d - d // 2) // 65535

    async def connect(self, attempts=None):
        """Bring the link up, retrying with backoff. Returns True when up, or False after `attempts` failed
        attempts (None: never give up)."""
        made = 0
        while True:
            if await self._attempt():
                return True
            made += 1
            if attempts is not None and made >= attempts:
                return False
            delay = self.backoff_ms(self._streak)
            _log.info("wifi retry scheduled", ssid=self.ssid, failures=self._streak, delay_ms=delay)
            await self._sleep_ms(delay)

    def _power_save_off(self, w):
        try:
            w.config(pm=self.power_mode)
        except (ValueError, TypeError, OSError) as e:  # a port or chip without cyw43 power management
            _log.debug("wifi power mode not set", error=log.exc_summary(e))

    async def _attempt(self):
        w = self.wlan
        self.attempts += 1
        try:
            if not w.active():
                w.active(True)
            self._power_save_off(w)  # after every power-up: the chip forgets it
            _log.info("wifi connecting", ssid=self.ssid, attempt=self.attempts)
            w.connect(self.ssid, self._password)
        except OSError as e:
            self._failed(None, "connect() raised " + log.exc_summary(e))
            return False
        waited = 0
        last = None
        while True:
            st = w.status()
            self.status = st
            if st != last:
                last = st
                if st == 3:
                    self._went_up()
                    return True
                if st < 0:
                    self._failed(st, _meaning(st, "unknown failure"))
                    return False
                if st in (1, 2):
                    _log.info("wifi " + _meaning(st, ""), ssid=self.ssid, status=st, reason=status_name(st))
                else:  # 0 or an unknown code while connecting: say so, keep waiting until the timeout
                    _log.warning("wifi status while connecting", ssid=self.ssid, status=st, reason=status_name(st))
            if waited >= self.connect_timeout_ms:
                self._failed(st, "no connection after %d ms (stuck at %s)" % (waited, status_name(st)))
                return False
            await self._sleep_ms(self.poll_ms)
            waited += self.poll_ms

    def _failed(self, st, why):
        self.failures += 1
        self._streak += 1
        if st == -3:
            # A wrong password will not fix itself in seconds: wait the longest between attempts.
            self._streak = max(self._streak, 20)
        _log.error("wifi connect failed", ssid=self.ssid, status=st, reason=status_name(st), detail=why,
                   failures=self.failures)
        if len(self._nets) > 1:  # the next network, in order, round and round
            self._nets.append(self._nets.pop(0))
            self.ssid, self._password = self._nets[0]
        try:
            self.wlan.disconnect()  # leave the driver idle before the next attempt
        except OSError:
            pass

    def _went_up(self):
        w = self.wlan
        self.is_up = True
        self._streak = 0
        self.io_failures = 0
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self._up_since = hal.ticks_ms()
        try:
            self.ip = w.ifconfig()[0]
        except (OSError, AttributeError):
            self.ip = None
        self._read_rssi()
        _log.info("wifi up", ssid=self.ssid, status=3, ip=self.ip, rssi=self.rssi, reconnects=self.reconnects)
        self._emit(True)

    def _went_down(self, reason, detail):
        if not self.is_up:
            return
        self.is_up = False
        self.drops += 1
        up_ms = ticks_diff(hal.ticks_ms(), self._up_since)
        self._up_total_ms += up_ms
        self._up_since = None
        _log.warning("wifi down", ssid=self.ssid, status=self.status, reason=reason, detail=detail,
                     link_uptime_ms=up_ms)
        self._emit(False)

    def _read_rssi(self):
        try:
            self.rssi = self.wlan.status("rssi")
        except (OSError, ValueError, TypeError):
            pass

    # ---- link health ----
    def io_failed(self):
        """A caller's network I/O failed (timeout, reset, unreachable). After dead_after in a row the link is taken
        as dead even if isconnected() says otherwise, and run() reconnects it."""
        if not self.is_up:
            return
        self.io_failures += 1
        if self.io_failures >= self.dead_after:
            self.link_deaths += 1
            self._restart_link("link_dead", "%d I/O failures in a row while the driver reports connected"
                               % self.io_failures)

    def reconnect(self):
        """Drop the link and let run() bring it up again (e.g. WatchdogManager's first escalation step). Returns at
        once: the reconnection, with its backoff, happens in run()."""
        if self.is_up:
            self._restart_link("reconnect_requested", "reconnect requested")
        elif self._wake is not None:
            self._wake.set()

    def _restart_link(self, reason, detail):
        self._went_down(reason, detail)
        try:
            w = self.wlan
            w.disconnect()
            w.active(False)  # power-cycle the chip: a wedged cyw43 needs more than a disconnect
        except OSError:
            pass
        if self._wake is not None:
            self._wake.set()

    def io_ok(self):
        """A caller's network I/O succeeded: the link carries traffic."""
        self.io_failures = 0

    def check(self):
        """Look at the driver once: a link that went down visibly is marked down. Returns is_up."""
        if not self.is_up:
            return False
        w = self.wlan
        st = w.status()
        self.status = st
        if st != 3 or not w.isconnected():
            self._went_down(status_name(st), _meaning(st, "unknown status"))
            try:
                w.disconnect()
            except OSError:
                pass
            return False
        self._read_rssi()
        return True

    async def run(self):
        """Keep the link up for ever: connect, watch, reconnect."""
        self._wake = asyncio.Event()
        while True:
            if not self.is_up:
                await self.connect()
            try:
                await asyncio.wait_for(self._wake.wait(), self.check_ms / 1000)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self.check()

    def link_uptime_ms(self):
        return ticks_diff(hal.ticks_ms(), self._up_since) if self.is_up else 0

    def stats(self):
        up_ms = self.link_uptime_ms()
        return {"up": self.is_up, "ssid": self.ssid, "ip": self.ip if self.is_up else None, "rssi": self.rssi,
                "status": self.status, "status_name": status_name(self.status), "attempts": self.attempts,
                "failures": self.failures, "connects": self.connects, "reconnects": self.reconnects,
                "drops": self.drops, "link_deaths": self.link_deaths, "io_failures": self.io_failures,
                "link_uptime_s": up_ms // 1000, "total_uptime_s": (self._up_total_ms + up_ms) // 1000}


def _default_sleep(ms):
    return sleep_ms(ms)
