# The device's side of the heartbeat (docs/protocol.md §5), a part of Device (iotlib/device.py) kept apart so that
# each reads in one screen: the body (built in one place, _heartbeat_body), the long-poll that carries news back on
# the same connection, the answer's news (a newer config, desired state or OTA offer) and the steps of the watchdog's
# escalation ladder (Wi-Fi reconnect, re-registration). WatchdogManager.heartbeat drives it: seq, uptime and mem_free
# are the watchdog's, the rest is here.
from iotlib.compat import asyncio, ticks_ms, ticks_diff
from iotlib import log as _logmod
from iotlib import __version__

_log = _logmod.get("device")


class Heartbeat:
    #: Fewest seconds between two Wi-Fi reconnects ordered by the heartbeat ladder: while the control plane is away
    #: the ladder repeats, and every reconnect takes the local API off the network for a few seconds.
    wifi_reconnect_min_s = 600
    #: Hold each heartbeat as a long-poll for up to one heartbeat interval (docs/protocol.md §5): a config or desired
    #: state change reaches the device within a round trip instead of at its next heartbeat, on the same connection.
    longpoll = True

    def _heartbeat_every(self, s):
        self.wd.heartbeat_hold_ms = s * 1000 if self.longpoll else 0
        self.wd.set_heartbeat_interval(s * 1000)

    async def _send_heartbeat(self, body):
        if (not self.auth.token or not self.auth.services.get("heartbeat")) and self.wd.heartbeat_hold_ms:
            # not registered yet: wait for it as long as a poll would be held, not a failed heartbeat's retry delay
            self._reg_wake.clear()
            try:
                await asyncio.wait_for(self._reg_wake.wait(), self.wd.heartbeat_hold_ms / 1000)
            except asyncio.TimeoutError:
                pass
        if not self.auth.token or not self.auth.services.get("heartbeat"):
            raise OSError("not registered")
        url = self.auth.services["heartbeat"]
        hold = self.wd.heartbeat_hold_ms // 1000
        if hold:
            # the long-poll answers when a version differs from the newest we know of: told by the last answer, or
            # reached by our own fetches and updates (our own report must not answer our poll)
            url += "?wait=%d" % hold
            k = self._known
            for i, name, mine in ((0, "config_version", self.cfg.version), (1, "state_version", body["state_version"])):
                if mine is not None and (k[i] is None or mine > k[i]):
                    k[i] = mine
                if k[i] is not None:
                    url += "&%s=%d" % (name, k[i])
            # an assignment (or its withdrawal) answers the poll at once; the offer told of does not again
            url += "&ota=" + (k[2] or "").replace("+", "%2B")
        from iotlib.http import Yielded
        try:
            r = await self.http.request("POST", url, json=body, headers=self.auth.auth_header(),
                                        timeout_ms=self.wd.heartbeat_timeout_ms + hold * 1000, yieldable=hold > 0)
        except Yielded:  # a report, an alarm or a fetch needed the connection: poll again once it is done
            self.wd.again = True
            return {"ack": body["seq"]}
        except BaseException as e:  # HTTPError, or the watchdog's timeout cancelling an exchange a hung server holds
            if not self.degraded:  # said once per episode, not at every heartbeat
                self._lost("heartbeat: " + (_logmod.exc_summary(e) or "timeout"))
            raise
        if r.status == 401:
            self.auth.invalidate()
            self._config_wake.set()
            raise OSError("heartbeat: token refused")
        if r.status != 200:
            ra = r.headers.get("retry-after")
            if ra and ra.isdigit():
                self.wd.retry_after_ms = int(ra) * 1000
            raise OSError("heartbeat: HTTP %d" % r.status)
        self._contact()
        return r.json()

    def _heartbeat_answer(self, answer):
        pending = answer.get("pending") or {}
        cv = pending.get("config_version")
        k = self._known
        for i, v in ((0, cv), (1, pending.get("state_version"))):
            if isinstance(v, int) and v != k[i]:
                k[i] = v
                self.wd.again = True  # news: hold the next poll at once
        if isinstance(cv, int) and cv != self.cfg.version and (self.cfg.rejected is None or self.cfg.rejected[0] != cv):
            self._config_wake.set()
        ota = pending.get("ota")
        if ota != k[2] and (ota is None or isinstance(ota, str)):
            k[2] = ota
            self.wd.again = True
        if ota:
            self._ota_wake.set()
        sv = pending.get("state_version")
        if self.sm is not None and sv is not None:
            self.sm.notify(sv)

    def _heartbeat_body(self):
        """What a heartbeat carries besides the watchdog's seq, uptime and mem_free (docs/protocol.md §5), all of it
        built here; the controller adds its telemetry (`t`)."""
        from iotlib.metrics import HEAP_LOW, MEM_ERRORS
        n = self.net
        body = {"rssi": n.rssi if n else None, "reconnects": n.reconnects if n else 0, "firmware": __version__,
                "config_version": self.cfg.version, "state_version": self.sm.version if self.sm else None}
        if HEAP_LOW[0] is not None:  # the low-water mark /info and /metrics report (None: not sampled yet)
            body["mem_min"] = HEAP_LOW[0]
        if MEM_ERRORS:  # MemoryErrors survived since boot, by where: the control plane shows them with the heap figures
            body["mem_errors"] = MEM_ERRORS
        t = self.telemetry()
        if t:
            body["t"] = t
        return body

    def _reconnect(self):
        if self._refused:
            _log.info("wifi reconnect skipped: the control plane answers, it refuses the registration")
            return
        now = ticks_ms()
        if self._last_reconnect is not None and ticks_diff(now, self._last_reconnect) < self.wifi_reconnect_min_s * 1000:
            _log.info("wifi reconnect skipped: one was done recently", min_interval_s=self.wifi_reconnect_min_s)
            return
        self._last_reconnect = now
        self.net.reconnect()

    def _reregister(self):
        self.auth.invalidate()
        self._config_wake.set()
