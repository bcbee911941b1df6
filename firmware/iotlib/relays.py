# Relay bank: config-driven relays with power-on modes, interlock groups, pulse / maximum on-time, failsafe state and
# persisted states. Switching is atomic with respect to other coroutines: one lock, and within an interlock group every
# other relay is driven off BEFORE the requested one goes on, so an interlocked pair is never on together, not even for
# one pin write. (Tasmota's Interlock and ESPHome's interlock_wait_time are the models.)
from iotlib.compat import const, asyncio, sleep_ms
from iotlib import fsutil

_MAX_PIN = const(28)
# GPIO 23, 24, 25 and 29 are wired to the CYW43 Wi-Fi chip on a Pico W.
_RESERVED = (23, 24, 25, 29)
POWER_ON = ("off", "on", "restore")
FAILSAFE = ("keep", "off", "on")
# Why a relay switched (on_change's third argument, the reported `cause`, the switch log line; docs/devices.md):
# "local", "desired", "pulse", "max_on", "failsafe", "interlock", "power_on" — plain strings, not named constants:
# every module-level name is one more interned name on the device.


class RelayError(ValueError):
    pass


def _default_pin_factory(pin, level):
    from iotlib import hal
    return hal.Pin(pin, hal.Pin.OUT, value=level)


def validate(relays):
    """Problems of a relays config section ({name: {pin, active_low, power_on, interlock, max_on_s, pulse_ms,
    failsafe}}), each as "relays.<name>.<field>: problem"; empty list when valid."""
    errs = []
    if not isinstance(relays, dict):
        return ["relays: must be an object"]
    if len(relays) > RelayBank.max_relays:
        errs.append("relays: at most %d relays" % RelayBank.max_relays)
    seen = {}
    for name in sorted(relays, key=str):  # sorted: MicroPython dicts have no stable order
        r = relays[name]
        p = "relays." + str(name)
        if not isinstance(name, str) or not name or len(name) > 32 or not all(c.isalpha() or c.isdigit() or c in "_-"
                                                                             for c in name):
            errs.append(p + ": name must be 1-32 chars of [A-Za-z0-9_-]")
        elif name in ("cause", "rejected"):  # keys of the reported state that are not relays
            errs.append(p + ": name reserved (a key of the reported state)")
        if not isinstance(r, dict):
            errs.append(p + ": must be an object")
            continue
        pin = r.get("pin")
        if not isinstance(pin, int) or isinstance(pin, bool) or pin < 0 or pin > _MAX_PIN:
            errs.append(p + ".pin: must be an integer 0-%d" % _MAX_PIN)
        elif pin in _RESERVED:
            errs.append(p + ".pin: GPIO%d is wired to the Wi-Fi chip on a Pico W" % pin)
        elif pin in seen:
            errs.append(p + ".pin: GPIO%d already used by %s" % (pin, seen[pin]))
        else:
            seen[pin] = name
        for key, allowed in (("power_on", POWER_ON), ("failsafe", FAILSAFE)):
            if key in r and r[key] not in allowed:
                errs.append("%s.%s: must be one of %s" % (p, key, "|".join(allowed)))
        for key in ("max_on_s", "pulse_ms"):
            v = r.get(key, 0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v > 86400000:
                errs.append("%s.%s: must be a number >= 0" % (p, key))
        g = r.get("interlock")
        if g is not None and not isinstance(g, str):
            errs.append(p + ".interlock: must be a group name or null")
        if not isinstance(r.get("active_low", False), bool):
            errs.append(p + ".active_low: must be true or false")
        for key in r:
            if key not in ("pin", "active_low", "power_on", "interlock", "max_on_s", "pulse_ms", "failsafe"):
                errs.append("%s.%s: unknown field" % (p, key))
    return errs


class _Relay:
    __slots__ = ("name", "pin_no", "active_low", "power_on", "group", "max_on_ms", "pulse_ms", "failsafe", "pin",
                 "on", "timer", "switches", "cause")

    def __init__(self, name, cfg):
        self.name = name
        self.pin_no = cfg["pin"]
        self.active_low = cfg.get("active_low", False)
        self.power_on = cfg.get("power_on", "off")
        self.group = cfg.get("interlock")
        self.max_on_ms = int(cfg.get("max_on_s", 0) * 1000)
        self.pulse_ms = int(cfg.get("pulse_ms", 0))
        self.failsafe = cfg.get("failsafe", "keep")
        self.pin = None
        self.on = False
        self.timer = None
        self.switches = 0
        self.cause = None

    def level(self, on):
        return (0 if on else 1) if self.active_low else (1 if on else 0)


class RelayBank:
    #: Most relays one bank drives (a Pico W has 26 usable GPIOs; every relay costs RAM for its Pin and timer).
    max_relays = 16
    #: Longest pulse accepted from a request, in ms (a day): longer "pulses" are mistakes.
    max_pulse_ms = 86400000

    def __init__(self, path=None, pin_factory=None, on_change=None):
        """path: JSON file for the states of relays whose power_on is "restore" (None: not persisted).
        pin_factory(pin_no, level) -> object with .value(v); defaults to iotlib.hal.Pin.
        on_change(name, state_str, cause): called after every effective switch (reporting, metrics, the switch log);
        cause is one of the causes listed at the top of this module."""
        self._path = path
        self._pins = pin_factory or _default_pin_factory
        self._on_change = on_change
        self._relays = {}
        self._lock = asyncio.Lock()
        self._saved = None
        self.persist_writes = 0

    # --- configuration -------------------------------------------------------------------------------------------
    def configure(self, relays):
        """Apply a relays config section. First call = boot (power-on modes); later calls = hot reload (relays keep
        their state where they still exist; old pins are driven off before new pins are claimed). Raises RelayError
        listing every problem, and then changes nothing."""
        errs = validate(relays)
        if errs:
            raise RelayError("; ".join(errs))
        boot = not self._relays
        old = self._relays
        new = {}
        for name in sorted(relays):
            new[name] = _Relay(name, relays[name])
        saved = self._load() if boot else {}
        for name, r in new.items():
            if boot:
                r.on = r.power_on == "on" or (r.power_on == "restore" and saved.get(name) is True)
            elif name in old:
                r.on = old[name].on
                r.switches = old[name].switches
                r.cause = old[name].cause
        self._enforce_interlock(new)
        # Release relays that go away or move pins/polarity: their old pin is switched off first.
        for name, o in old.items():
            self._cancel_timer(o)
            n = new.get(name)
            if n is None or n.pin_no != o.pin_no or n.active_low != o.active_low:
                if o.pin is not None:
                    o.pin.value(o.level(False))
            else:
                n.pin = o.pin
        # Claim new pins at their OFF level, then switch on what must be on (offs first, then ons).
        for r in new.values():
            if r.pin is None:
                r.pin = self._pins(r.pin_no, r.level(False))
            elif not r.on:
                r.pin.value(r.level(False))
        for r in new.values():
            if r.on:
                r.pin.value(r.level(True))
                self._arm(r, r.pulse_ms, r.max_on_ms)
        self._relays = new
        self._persist()
        if boot:
            for r in new.values():
                if r.on:
                    self._notify(r, "power_on")

    def _enforce_interlock(self, relays):
        groups = {}
        for name in sorted(relays):
            r = relays[name]
            if r.on and r.group is not None:
                if r.group in groups:
                    r.on = False  # two on in one group after a reload: the first by name wins
                else:
                    groups[r.group] = name

    # --- switching -----------------------------------------------------------------------------------------------
    def names(self):
        return sorted(self._relays)

    def __contains__(self, name):
        return name in self._relays

    def state(self, name):
        r = self._relays[name]
        return "on" if r.on else "off"

    def states(self):
        return {n: ("on" if r.on else "off") for n, r in self._relays.items()}

    def causes(self):
        """{name: cause of its last switch} for the relays that switched since boot."""
        return {n: r.cause for n, r in self._relays.items() if r.cause is not None}

    def describe(self, name):
        r = self._relays[name]
        return {"name": name, "state": "on" if r.on else "off", "pin": r.pin_no, "active_low": r.active_low,
                "power_on": r.power_on, "interlock": r.group, "max_on_s": r.max_on_ms / 1000, "pulse_ms": r.pulse_ms,
                "failsafe": r.failsafe, "switches": r.switches, "cause": r.cause}

    async def set(self, name, state, pulse_ms=None, cause="local"):
        """Switch relay name to "on" | "off" | "toggle" (bool accepted). pulse_ms: switch back off after that long
        (default: the relay's configured pulse_ms; max_on_s caps any on-time). cause: "local" or "desired" (passed to
        on_change). Returns the new state string. KeyError for an unknown relay, ValueError for a bad state or pulse."""
        r = self._relays[name]
        if state is True or state is False:
            state = "on" if state else "off"
        if state not in ("on", "off", "toggle"):
            raise ValueError("state must be on, off or toggle")
        if pulse_ms is not None and (not isinstance(pulse_ms, int) or isinstance(pulse_ms, bool)
                                     or pulse_ms <= 0 or pulse_ms > self.max_pulse_ms):
            raise ValueError("pulse_ms must be an integer 1-%d" % self.max_pulse_ms)
        async with self._lock:
            on = (not r.on) if state == "toggle" else state == "on"
            self._switch(r, on, pulse_ms, cause)
        return "on" if r.on else "off"

    def _switch(self, r, on, pulse_ms, cause):
        # Synchronous from here on: no other coroutine can run between the offs and the on.
        self._cancel_timer(r)
        if on and r.group is not None:
            for o in self._relays.values():
                if o is not r and o.on and o.group == r.group:
                    self._write(o, False, "interlock")
        self._write(r, on, cause)
        if on:
            self._arm(r, pulse_ms or r.pulse_ms, r.max_on_ms)
        self._persist()

    def _write(self, r, on, cause):
        changed = r.on != on
        r.pin.value(r.level(on))
        r.on = on
        if changed:
            r.switches += 1
            self._notify(r, cause)

    def _notify(self, r, cause):
        r.cause = cause
        if self._on_change:
            try:
                self._on_change(r.name, "on" if r.on else "off", cause)
            except Exception:
                pass  # a reporting failure must never leave a relay half-switched

    def _arm(self, r, pulse, limit):
        # the shorter of the pulse and the on-time cap ends this "on"; the cause names which one it was
        cause = "max_on"
        if pulse and (not limit or pulse < limit):
            limit = pulse
            cause = "pulse"
        if limit:
            r.timer = asyncio.create_task(self._off_after(r, limit, cause))

    def _cancel_timer(self, r):
        t = r.timer
        if t is not None:
            r.timer = None
            if t is not _current_task():
                t.cancel()

    async def _off_after(self, r, ms, cause):
        await sleep_ms(ms)
        async with self._lock:
            if self._relays.get(r.name) is r and r.on:
                r.timer = None
                self._write(r, False, cause)
                self._persist()

    async def all_off(self, cause="local"):
        async with self._lock:
            for r in self._relays.values():
                self._cancel_timer(r)
                self._write(r, False, cause)
            self._persist()

    async def apply_failsafe(self):
        """Drive every relay to its configured failsafe state (control plane unreachable too long). Returns the names
        of the relays that changed."""
        changed = []
        async with self._lock:
            for r in self._relays.values():
                if r.failsafe == "off" and r.on:
                    self._cancel_timer(r)
                    self._write(r, False, "failsafe")
                    changed.append(r.name)
            for r in self._relays.values():
                if r.failsafe == "on" and not r.on:
                    self._switch(r, True, None, "failsafe")
                    changed.append(r.name)
            self._persist()
        return changed

    # --- persistence -----------------------------------------------------------------------------------------------
    def _load(self):
        d = fsutil.read_json(self._path, {}) if self._path else {}
        d = d if isinstance(d, dict) else {}
        self._saved = d
        return d

    def _persist(self):
        # Only relays with power_on=restore are worth flash wear, and only when their states really changed.
        if not self._path:
            return
        snap = {n: r.on for n, r in self._relays.items() if r.power_on == "restore"}
        if snap == self._saved:
            return
        try:
            fsutil.write_json_atomic(self._path, snap)
            self._saved = snap
            self.persist_writes += 1
        except OSError:
            pass  # flash full: the relay still switched; the next change tries again

    def shutdown(self):
        for r in self._relays.values():
            self._cancel_timer(r)


def _current_task():
    try:
        return asyncio.current_task()
    except Exception:
        return None
