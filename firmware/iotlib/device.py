# The lifecycle both reference controllers share (docs/devices.md): boot from flash, Wi-Fi, the local web API,
# registration, configuration, time, then supervised steady-state tasks; degraded mode when the control plane is away
# (the local API keeps serving on the last-known-good config, alarms and state are buffered and resynced in full).
# A controller subclass gives: device_type, capabilities, schema()/defaults(), setup_domain(), domain routes, the
# state-delta handler, its telemetry and its own supervised tasks. Apart, so that each reads on its own: the heartbeat
# (iotlib.heartbeat, the base class) and OTA, the boot guard and safe mode (iotlib.otaguard, loaded only while it
# works). The states and what moves between them: docs/firmware-design.md, "Device states".
from iotlib.compat import asyncio, ticks_ms, ticks_diff, mem_free, _clk, urandom
from iotlib import log as _logmod
from iotlib import __version__
from iotlib.heartbeat import Heartbeat

_log = _logmod.get("device")

COMMON_SCHEMA = {
    "heartbeat_interval_s": {"type": "int", "min": 1, "max": 3600},
    "time": {"servers": {"type": "list", "items": {"type": "str", "min": 1}, "max": 4},
             "interval_s": {"type": "int", "min": 16, "max": 86400}},
    "api": {"token_hashes": {"type": "list", "items": {"type": "str", "min": 64, "max": 64}, "max": 16},
            "tokens": {"type": "list", "items": {"type": "dict"}, "max": 16},
            "rate_per_s": {"type": "number", "min": 0.001, "max": 1000},
            "burst": {"type": "int", "min": 1, "max": 1000}},
    "log": {"level": {"type": "str", "enum": ["debug", "info", "warning", "error", "critical"]}},
}

COMMON_DEFAULTS = {
    "heartbeat_interval_s": 10,
    "time": {"servers": [], "interval_s": 3600},
    "api": {"token_hashes": [], "tokens": [], "rate_per_s": 5, "burst": 10},
    "log": {"level": "info"},
}


class Device(Heartbeat):
    device_type = "generic"
    capabilities = ("rest",)
    #: Seconds after boot at which /ready stops waiting for a time sync (docs/devices.md, the boot sequence).
    time_grace_s = 30
    #: Seconds between config polls when no heartbeat says there is a newer version.
    config_poll_s = 60
    #: Retry delays (s) for registration / config when the control plane is away: doubles up to the max.
    retry_min_s = 2
    retry_max_s = 60
    #: Ed25519 public key (64 hex) OTA manifests must be signed with; None disables OTA (docs/ota.md)
    ota_public_key = None
    #: DER bytes of the CA that signed the control plane's certificate (https discovery URL); None: the port's default
    cadata = None
    #: More Wi-Fi networks [(ssid, password), ...] tried in order after wifi_ssid (the board settings file's "wifi")
    wifi_networks = None
    #: Seconds between OTA checks when no heartbeat names a pending release.
    ota_check_s = 3600
    #: Seconds of uptime after which this boot no longer counts towards safe mode (healthy clears it sooner).
    stable_after_s = 120
    #: Boots in a row that reached neither healthy nor stable_after_s before the device starts in safe mode.
    safe_mode_after = 3
    #: Download attempts an update boot makes when transport errors cut them (retry_min_s apart, doubling).
    ota_attempts = 3
    #: Update boots in a row cut by transport errors before the release is reported failed.
    ota_retries = 3
    #: Seconds normal work waits (doubling per cut update boot) before it accepts the same offer again.
    ota_retry_s = 60
    #: An offer the running device accepted, installed by the next boot (iotlib.otaguard.update_boot).
    offer_file = "ota/offer.json"

    def __init__(self, wifi_ssid, wifi_password, device_id, device_key, service_discovery_url, namespace=None,
                 host="0.0.0.0", port=80, flash_dir=None, address=None, config=None):
        """config: a factory config merged over the built-in defaults (the control plane's config still wins)."""
        self.wifi_ssid = wifi_ssid
        self._wifi_password = wifi_password
        self.device_id = device_id
        self._device_key = device_key
        self.sd_url = service_discovery_url
        self.namespace = namespace
        self.host = host
        self.port = port
        self.flash_dir = flash_dir
        self.address = address
        self.factory_config = config
        # the collaborators: made by boot() and start() (they need the flash and the config; an update boot makes
        # only net, http and auth), sm and ts at the first registration (they need its service URLs and time
        # server; never in safe mode)
        self.cfg = self.alarms = self.wd = self.http = self.auth = self.net = self.web = None
        self.sm = self.ts = None
        self._wd_task = None
        self.boot_info = {}
        self.ota_boot = None  # what the boot guard found (iotlib.otaguard.boot)
        self.trial = None  # the version on trial this boot, None when none is
        self._ota_used = False  # an update left something on flash: OTABoot keeps the books (otaguard.in_use)
        self._trial_s = 0  # seconds the trial has to reach healthy
        self._own_clock = False
        self.started_ms = ticks_ms()
        self.registered = False
        self.last_contact_ms = None
        self.degraded = True
        self._config_wake = asyncio.Event()
        self._state_started = False
        self._last_reconnect = None
        self._refused = False  # the last registration was refused by the control plane (it answered: 401/403)
        self.safe_mode = False
        self.healthy = False
        self._ota_wake = asyncio.Event()
        # config and state versions and the OTA offer the control plane has told of (the long-poll's baseline)
        self._known = [None, None, None]
        self._reg_wake = asyncio.Event()

    # --- subclass hooks --------------------------------------------------------------------------------------------
    def schema(self):
        return dict(COMMON_SCHEMA)

    def defaults(self):
        from iotlib.config import copy
        return copy(COMMON_DEFAULTS)  # deep: callers edit nested sections

    def setup_domain(self, config):
        """Create the domain objects from the boot config (relays at their power-on state, sensors)."""

    def routes(self, web):
        """Register the domain's routes on the DeviceWeb."""

    def domain_tasks(self, wd):
        """Supervise the domain's loops on the WatchdogManager."""

    def on_delta(self, delta):
        """Apply desired-state fields; return the reported fields (dict) or None. May be a coroutine."""
        return None

    def reported(self):
        """The full reported state after a (re)connect."""
        return {}

    def info_extra(self):
        return {}

    def telemetry(self):
        """Telemetry for the next heartbeat (docs/protocol.md, `t`): a dict, or None when there is none."""
        return None

    # --- paths ------------------------------------------------------------------------------------------------------
    def flash(self, name):
        """name under the device's flash dir (None: the board's, hal.flash_root())."""
        from iotlib import hal
        return hal.flash_path(name, self.flash_dir)

    def _guard(self):
        # iotlib.otaguard (OTA, boot guard, safe mode) is on the heap only while it works: dropped from sys.modules
        # at once, the call in progress keeps what it runs
        from iotlib import otaguard
        otaguard.unload("iotlib.otaguard")
        return otaguard

    # --- boot -------------------------------------------------------------------------------------------------------
    def boot(self):
        """Step 1: persisted config (last-known-good), the managers, the domain at its power-on state."""
        from iotlib import fsutil
        from iotlib.config import ConfigManager, merge
        from iotlib.auth import AuthManager
        from iotlib.alarms import AlarmManager
        from iotlib.watchdog import WatchdogManager
        from iotlib.http import HTTPClient
        from iotlib import metrics, hal
        root = self.flash("").rstrip("/")
        if root:
            fsutil.makedirs(root)
        # first: finish an interrupted update swap / roll a failed trial back, count boots for safe mode
        self._guard().boot(self)
        defaults = self.defaults()
        if self.factory_config:
            defaults = merge(defaults, self.factory_config)
        self.cfg = ConfigManager(self.schema(), defaults, path=self.flash("config.json"))
        loaded = self.cfg.load()
        _logmod.set_level(self.cfg.config["log"]["level"])
        # a board's clock starts unsynced (main.py): then this device steps it from registration and SNTP
        self._own_clock = not _clk[2]
        self.alarms = AlarmManager(path=self.flash("alarms"))
        self.wd = WatchdogManager(on_crash=self.alarms.report_exception)
        self.wd.missed_reset = None  # degraded mode: never reset just because the control plane is away
        self.boot_info = self.wd.boot_report()
        self.http = HTTPClient(cadata=self.cadata)  # HTTPClient's timeouts: 5 s to connect, 10 s per exchange
        # the HTTP client's connects feed the link-death detector: a cyw43 link can die while isconnected() is True
        self.http.on_io = lambda ok: self.net.io_ok() if ok else self.net.io_failed()
        self.http.link_check = hal.link_check
        self.auth = AuthManager(self.device_id, self._device_key, sd_url=self.sd_url, namespace=self.namespace,
                                info=self._reg_info())
        self._apply_api(self.cfg.config["api"])
        metrics.register_builtins()
        if self.safe_mode:  # boots in a row never got healthy: no domain, no local API, no state/time (docs/ota.md)
            _log.error("safe mode", boots=self.ota_boot["boots"])
        else:
            self.setup_domain(self.cfg.config)
        self.cfg.on_change("api", self._apply_api)
        self.cfg.on_change("log", lambda sec: _logmod.set_level(sec["level"]))
        self.cfg.on_change("time", self._apply_time)
        self.cfg.on_change("heartbeat_interval_s", self._heartbeat_every)
        self._heartbeat_every(self.cfg.config["heartbeat_interval_s"])
        _log.info("boot", device_id=self.device_id, type=self.device_type, config_version=self.cfg.version,
                  last_known_good=loaded, reset_cause=self.boot_info.get("reset_cause"))

    def _reg_info(self):
        caps = list(self.capabilities)
        if self.safe_mode:  # the control plane shows it and its safe_mode alert rules fire on it (docs/ota.md)
            caps.append("safe_mode")
        info = {"device_type": self.device_type, "firmware": __version__, "capabilities": caps,
                "reset_cause": self.boot_info.get("reset_cause")}
        if self.address:
            info["address"] = self.address
        return info

    def _wifi_up(self, up):
        # the address the WLAN actually has goes into the next registration (a launcher's `address` wins)
        ip = self.net.ip if up else None
        if ip and not self.address and ip != "0.0.0.0":
            self.auth.info["address"] = "http://%s:%d" % (ip, self.port) if self.port != 80 else "http://" + ip

    def _apply_api(self, api):
        static = {}
        for h in api.get("token_hashes") or ():
            static[h.lower()] = "viewer"
        for t in api.get("tokens") or ():
            h = t.get("sha256")
            if not isinstance(h, str) or len(h) != 64 or t.get("role") not in ("viewer", "operator", "admin"):
                raise ValueError("api.tokens: each needs sha256 (64 hex) and role viewer|operator|admin")
            static[h.lower()] = t["role"]
        if self.web is not None:
            self.web.configure(api)
        self.auth.static_tokens = static

    def _apply_time(self, sec):
        if self.ts is not None:
            self.ts.configure(self._ntp_servers(sec), sec.get("interval_s"))

    def _ntp_servers(self, sec=None):
        sec = sec or self.cfg.config["time"]
        servers = list(sec.get("servers") or ())
        ntp = self.auth.services.get("ntp") if self.auth.services else None
        if ntp and ntp not in servers:
            servers.insert(0, ntp)
        return servers

    # --- the web API ------------------------------------------------------------------------------------------------
    def build_web(self):
        from iotlib.web import DeviceWeb
        self.web = DeviceWeb(self.auth.verify, info=self.info, ready=self.readiness, on_reboot=self.reboot)
        self.web.configure(self.cfg.config["api"])
        self.routes(self.web)
        return self.web

    def info(self):
        d = {"device_id": self.device_id, "type": self.device_type, "firmware": __version__,
             "uptime_s": ticks_diff(ticks_ms(), self.started_ms) // 1000, "config_version": self.cfg.version,
             "reset_cause": self.boot_info.get("reset_cause"), "registered": self.registered,
             "degraded": self.degraded, "namespace": self.auth.namespace, "mem_free": mem_free(),
             "time_synced": bool(self.ts and self.ts.synced)}
        from iotlib.metrics import HEAP_LOW
        d["mem_free_min"], d["largest_free_block_min"] = HEAP_LOW  # low-water marks since boot (None: not sampled)
        d.update(self.info_extra())
        return d

    def readiness(self):
        synced = bool(self.ts and self.ts.synced)
        grace_over = ticks_diff(ticks_ms(), self.started_ms) >= self.time_grace_s * 1000
        ok = self.registered and self.cfg.version > 0 and (synced or grace_over)
        return ok, {"registered": self.registered, "config_version": self.cfg.version, "time_synced": synced,
                    "degraded": self.degraded}

    async def reboot(self):
        if not self.safe_mode:
            self.persist()
        from iotlib import hal
        hal.reset()

    def persist(self):
        """Persist what must survive a reset (subclasses add their state)."""

    # --- control plane ------------------------------------------------------------------------------------------------
    def _contact(self):
        self.last_contact_ms = ticks_ms()
        if self.degraded:
            _log.info("control plane reachable")
        self.degraded = False

    def _lost(self, why, retry_s=None):
        _log.warning("control plane unreachable" + ("" if self.degraded else ": degraded mode"), reason=why,
                     retry_s=retry_s)
        self.degraded = True

    async def _cloud(self):
        """Registration + configuration: register (again) when needed, fetch config when told or every poll."""
        delay = self.retry_min_s
        seen = 0
        while True:
            try:
                if self._own_clock and not _clk[2] and self.sd_url.startswith("https") and self._ntp_servers():
                    # rp2's TLS checks the certificate's dates against the RTC, which reads 2021 until synced: one
                    # SNTP round (plain UDP, the config's time.servers) before the first HTTPS registration
                    from iotlib.timesync import TimeSyncManager
                    t = TimeSyncManager(self._ntp_servers(), step=self._step_clock)
                    t.retries = 0
                    await t.sync()
                    t = None
                tok = await self.auth.ensure_token(self.http)
                self._refused = False
                if self.auth.registrations != seen:
                    seen = self.auth.registrations
                    self._registered()
                url = self.auth.services.get("config")
                if url:
                    ok, reason = await self.cfg.fetch(self.http, url, tok)
                    if reason.startswith("HTTP 401"):
                        self.auth.invalidate()
                        raise OSError("config: token refused")
                    if not self.healthy and (ok or reason == "not modified"):
                        self._became_healthy()
                self._contact()
                delay = self.retry_min_s
                wait = self.config_poll_s
            except Exception as e:  # HTTPError, AuthError, OSError: degrade, retry with backoff
                why = _logmod.exc_summary(e)
                if getattr(e, "status", 0) in (401, 403):  # AuthError: the control plane answered and refused
                    # the link and the server are fine, the device id or key is not (no Wi-Fi reconnect will fix
                    # that: _reconnect skips it)
                    self._refused = True
                    _log.error("registration refused by the control plane: check the device id and key",
                               reason=why, retry_s=delay)
                    self.degraded = True
                else:
                    self._lost(why, delay)
                # jittered over half..all of it: a fleet that lost the control plane together must not come back
                # together
                wait = delay * (128 + urandom(1)[0] // 2) / 255
                delay = min(delay * 2, self.retry_max_s)
            self.wd.checkin("cloud")
            self._config_wake.clear()
            try:
                await asyncio.wait_for(self._config_wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self.wd.checkin("cloud")

    def _registered(self):
        from iotlib.state import StateManager
        from iotlib.timesync import TimeSyncManager
        self.registered = True
        self._reg_wake.set()
        iv = self.auth.intervals or {}
        if iv.get("config_poll"):
            self.config_poll_s = iv["config_poll"]
        st = self.auth.server_time
        if self._own_clock and not _clk[2] and isinstance(st, int) and st > 0:
            self._step_clock(st)  # coarse (one round trip), but no longer 2021; SNTP refines it
        _log.info("registered", namespace=self.auth.namespace, registrations=self.auth.registrations)
        if self.healthy or self.safe_mode:
            # (a first registration waits for healthy, which wakes it: the OTA code is not loaded beside the first
            # config and state fetches, the peak of a boot)
            self._ota_wake.set()
        if self.safe_mode:
            return
        if not self._state_started:
            self._state_started = True
            self.sm = StateManager(self.http, self.auth)
            self.sm.on_delta(self.on_delta)
            self.sm.report(self.reported())
            self.wd.supervise("state", self.sm.run, critical=False)
            t = self.cfg.config["time"]
            self.ts = TimeSyncManager(self._ntp_servers(t), t.get("interval_s", 3600), on_alarm=self.alarms.fire,
                                      on_clear=self.alarms.clear, step=self._step_clock if self._own_clock else None)
            self.wd.supervise("time", self.ts.run, critical=False)
        else:
            self.sm.disconnected()  # full GET on every (re)connect
            self.sm.report(self.reported())
            self.sm._wake()
            self._apply_time(self.cfg.config["time"])

    def _step_clock(self, ms):
        from iotlib.timesync import set_clock
        first = not _clk[2]
        step = set_clock(ms)
        if first:
            self.alarms.clock_stepped(step)
            _log.info("time synced", server="registration", offset_ms=step)

    def _alarm_target(self):
        url = self.auth.services.get("alarms") if self.auth.services else None
        return (url, self.auth.token) if url and self.auth.token else None

    # --- OTA, boot guard, safe mode (iotlib/otaguard.py, docs/ota.md) ----------------------------------------------------
    def _became_healthy(self):
        self.healthy = True
        self._guard().healthy(self)  # clears the boot counter, commits a trial
        self._ota_wake.set()  # report the result now

    async def _trial_watch(self):
        # a trial that is not healthy (_became_healthy commits it) within its time is rolled back; this loop stays
        # in Device so that no OTA code is on the heap while the trial runs
        waited = 0
        while self.trial is not None:
            if waited >= self._trial_s:
                self._guard().trial_failed(self)
            await asyncio.sleep(1)
            waited += 1

    async def _stable_timer(self):
        await asyncio.sleep(self.stable_after_s)
        if self.trial is None:  # during a trial only healthy counts
            self._guard().stable(self)

    async def _ota_task(self):
        while True:
            self._ota_wake.clear()
            url = self.auth.services.get("ota") if self.auth.services else None
            wait = None
            # not during a trial; with OTA off and nothing an update left on flash there is nothing to do
            if url and self.auth.token and self.trial is None and (self._ota_used or self.ota_public_key is not None):
                wait = await self._guard().check(self, url)
            self.wd.checkin("ota")
            try:
                await asyncio.wait_for(self._ota_wake.wait(), wait or self.ota_check_s)
            except asyncio.TimeoutError:
                pass

    # --- main -----------------------------------------------------------------------------------------------------
    async def start(self):
        """Steps 1-2 and the supervised tasks; returns once the local API listens (main() then waits for ever). In an
        update boot it installs the accepted update and resets instead (otaguard.update_boot)."""
        if self.ota_public_key is not None and update_pending(self.flash_dir):
            await self._guard().update_boot(self)
        from iotlib.net import NetworkManager
        self.boot()
        self.net = NetworkManager(self.wifi_ssid, self._wifi_password, networks=self.wifi_networks)
        self.net.on_change(self._wifi_up)
        await self.net.connect()
        if not self.safe_mode:
            from iotlib import hal
            self.build_web()
            await self.web.start(self.host, hal.listen_port(self.port))
            _log.info("listening", port=self.web.port)
        wd = self.wd
        wd.supervise("net", self.net.run, critical=False)
        wd.supervise("cloud", self._cloud, window_ms=(self.retry_max_s + self.config_poll_s + 30) * 1000)
        wd.supervise("ota", self._ota_task, critical=False)
        asyncio.create_task(self._stable_timer())
        if self.trial is not None:
            wd.supervise("ota_trial", self._trial_watch, critical=False)
        if not self.safe_mode:
            wd.supervise("alarms", lambda: self.alarms.run(self.http, self._alarm_target), critical=False)
        wd.heartbeat(self._send_heartbeat, payload=self._heartbeat_body, on_answer=self._heartbeat_answer,
                     reconnect=self._reconnect, reregister=self._reregister,
                     persist=None if self.safe_mode else self.persist, critical=False)
        if not self.safe_mode:
            self.domain_tasks(wd)
        from iotlib import metrics
        wd.supervise("looplag", metrics.loop_lag_monitor, critical=False)
        self._wd_task = asyncio.create_task(wd.run())

    async def main(self):
        await self.start()
        while True:
            await asyncio.sleep(3600)

    async def stop(self):
        self.wd.stop()
        if self._wd_task is not None:
            self._wd_task.cancel()
        if self.web is not None:
            await self.web.stop()



def update_pending(flash_dir=None):
    """True when an accepted OTA offer waits on flash: the next start() is an update boot, and a launcher does not
    preload the application's code for it."""
    from iotlib import fsutil, hal
    return fsutil.exists(hal.flash_path(Device.offer_file, flash_dir))
