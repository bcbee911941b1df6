# RelaysController: the seed's relay/GPIO device. REST `GET /gpio`, `GET /gpio/<relay>`, `POST /gpio/<relay>`
# ({"state": "on"|"off"|"toggle", "pulse_ms"?}), desired state from the StateServer applied and reported back, a
# failsafe state when the control plane stays away for `failsafe_after_s`. Relays from config (iotlib.relays).
#
#   controller = RelaysController(wifi_ssid=…, wifi_password=…, device_id=…, device_key=…,
#                                 service_discovery_url=…, relay_pins={"relay1": 2, "relay2": 3})
#   await controller.main()
from iotlib.compat import asyncio, ticks_ms, ticks_diff
from iotlib.device import Device
from iotlib import log as _logmod

_log = _logmod.get("relays")


class RelaysController(Device):
    device_type = "relays"
    capabilities = ("relays", "rest")
    #: Seconds between checks of the failsafe timer.
    failsafe_check_s = 1

    def __init__(self, wifi_ssid, wifi_password, device_id, device_key, service_discovery_url, relay_pins=None,
                 **kw):
        """relay_pins {name: GPIO}: the board's wiring, and the truth for pins: a config that would move one of these
        relays to another pin, or add a relay they do not name, is refused (reported with its reason). Without it,
        relay1/relay2 on GPIO 2/3 unless the config says otherwise."""
        Device.__init__(self, wifi_ssid, wifi_password, device_id, device_key, service_discovery_url, **kw)
        self.wired = relay_pins is not None
        self.relay_pins = relay_pins or {"relay1": 2, "relay2": 3}
        self.bank = None
        self.failsafe_active = False
        self._rejected = []  # desired keys reported as rejected (cleared in reported once a valid value comes)
        self._events = []  # relay switches not yet sent on a heartbeat (_changed)

    def schema(self):
        s = Device.schema(self)
        s["relays"] = {"type": "dict"}  # checked in depth by iotlib.relays.validate (paths relays.<name>.<field>)
        s["failsafe_after_s"] = {"type": "number", "min": 0, "max": 86400}
        return s

    def defaults(self):
        d = Device.defaults(self)
        # Empty on purpose: config sections are deep-merged over the defaults, so built-in relays here would be merged
        # into every relay map the control plane sends (and collide on pins). relay_pins apply when none is given.
        d["relays"] = {}
        d["failsafe_after_s"] = 0
        return d

    def builtin_relays(self):
        r = {}
        for name in self.relay_pins:
            r[name] = {"pin": self.relay_pins[name], "power_on": "off", "failsafe": "keep"}
        return r

    def board_relays(self, section):
        """The config's relays section on this board's wiring: a relay without a pin takes it from relay_pins; with
        relay_pins given, a pin that differs from it or a relay it does not name is an error naming the path."""
        if not section:
            return self.builtin_relays()
        out = self.builtin_relays() if self.wired else {}
        errs = []
        for name in section:
            r = section[name]
            wired = self.relay_pins.get(name)
            if isinstance(r, dict) and r.get("pin") is None:
                if wired is None:
                    errs.append("relays.%s.pin: required (relay_pins wires no relay of that name)" % name)
                r = dict(r)
                r["pin"] = wired
            elif self.wired and isinstance(r, dict):
                if wired is None:
                    errs.append("relays.%s: not wired on this board (relay_pins: %s)"
                                % (name, ", ".join(sorted(self.relay_pins))))
                elif r["pin"] != wired:
                    errs.append("relays.%s.pin: GPIO%s refused: this board wires %s to GPIO%d (relay_pins)"
                                % (name, r["pin"], name, wired))
            out[name] = r
        if errs:
            raise ValueError("; ".join(errs))
        return out

    def _configure_relays(self, section):
        self.bank.configure(self.board_relays(section))

    def setup_domain(self, config):
        from iotlib.relays import RelayBank
        from iotlib import metrics
        self._m_on = metrics.gauge("iotlib_relay_on", "1 while the relay is on.", ("relay",))
        self._m_switches = metrics.counter("iotlib_relay_switches", "Effective relay switches since boot.", ("relay",))
        self.bank = RelayBank(path=self.flash("relays.json"), on_change=self._changed)
        try:
            self._configure_relays(config["relays"])
        except ValueError as e:  # a stored config the firmware no longer accepts: boot on the built-in relays
            _log.error("relay config unusable, using defaults", reason=str(e))
            self._configure_relays(None)
        self.cfg.on_change("relays", self._configure_relays)
        for name in self.bank.names():
            self._m_on.set(1 if self.bank.state(name) == "on" else 0, relay=name)

    def _changed(self, name, state, cause):
        # every switch: one log line and the cause reported beside the state; anything but the desired state itself
        # overrides a desired value (docs/devices.md, "Who wins")
        _log.info("relay switched", relay=name, state=state, cause=cause)
        # switch events for the telemetry history, sent on the next heartbeat as [value, age_ms] (no device clock);
        # at most 16 kept between heartbeats (oldest dropped): a few hundred bytes of heap at most
        ev = self._events
        if len(ev) >= 16:
            ev.pop(0)
        ev.append((name, 1 if state == "on" else 0, ticks_ms()))
        self._m_on.set(1 if state == "on" else 0, relay=name)
        self._m_switches.inc(relay=name)
        sm = self.sm
        if sm is not None:
            sm.report({name: state, "cause": {name: cause}})
            if cause != "desired":
                sm.override(name, state)

    def reported(self):
        r = self.bank.states()
        r["cause"] = self.bank.causes()
        return r

    def telemetry(self):
        ev = self._events
        if not ev:
            return None
        now = ticks_ms()
        t = {}
        for name, v, at in ev:
            t.setdefault(name, []).append([v, ticks_diff(now, at)])
        self._events = []  # sent (a lost heartbeat loses them: the shadow still has the state)
        return t

    def info_extra(self):
        return {"relays": self.bank.states(), "failsafe_active": self.failsafe_active}

    async def on_delta(self, delta):
        out = {}
        rejected = {}
        for name in delta:
            v = delta[name]
            if name in self.bank and (v is True or v is False or v in ("on", "off")):
                out[name] = await self.bank.set(name, v, cause="desired")
                if name in self._rejected:
                    self._rejected.remove(name)
                    rejected[name] = None
            elif name not in ("cause", "rejected"):
                why = "unknown relay" if name not in self.bank else "must be \"on\" or \"off\""
                _log.warning("desired state refused", relay=name, reason=why)
                rejected[name] = why
                if name not in self._rejected:
                    self._rejected.append(name)
        if rejected:
            out["rejected"] = rejected
        return out

    def routes(self, web):
        from iotlib.relays_api import install
        install(web, self.bank)

    # --- failsafe ---
    def domain_tasks(self, wd):
        wd.supervise("failsafe", self._failsafe_loop, critical=False)

    async def _failsafe_loop(self):
        while True:
            await asyncio.sleep(self.failsafe_check_s)
            after = self.cfg.config.get("failsafe_after_s") or 0
            last = self.last_contact_ms if self.last_contact_ms is not None else self.started_ms
            away = after > 0 and ticks_diff(ticks_ms(), last) >= after * 1000
            if away and not self.failsafe_active:
                self.failsafe_active = True
                changed = await self.bank.apply_failsafe()
                _log.warning("control plane away: relays at failsafe state", after_s=after, changed=changed)
                self.alarms.fire("relays.failsafe", "warning", "control plane unreachable for %ss: failsafe applied"
                                 % after)
            elif not away and self.failsafe_active:
                self.failsafe_active = False
                self.alarms.clear("relays.failsafe")

    def persist(self):
        pass  # RelayBank writes restore states at every change
