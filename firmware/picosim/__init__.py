# picosim: the simulated Pico W, test equipment outside iotlib. iotlib.hal hands it out where there is no real
# `machine`/`network` (unix port, CPython); a board bundle never contains it (picoiot.build). One module-level `board`
# holds everything a test may script: pins (with a transition log), ADC signals, I2C sensor models, the Wi-Fi link, the
# watchdog, the RTC, the clock and the flash directory. See docs/simulation.md.
# It implements what hal needs (Pin, WLAN, WDT, ADC, I2C, RTC, reset, the reset-cause register, flash root) and knows
# nothing of hal. Imports go one way: this module -> picosim.base; picosim.periph (ADC, I2C, RTC, loaded on first use) ->
# picosim.base, picosim.i2c (the sensor models) -> picosim.base.
#
# Scripted values (ADC channels, sensor fields, RSSI) take one of: a number (constant), a list (one item per read, the
# last one sticks), or a callable f(now_ms). An exception instance in a list is raised by the read that reaches it.
import os

from iotlib.compat import const, ticks_ms, ticks_add, ticks_diff
from picosim import base
from picosim.base import SimulatedReset, RESET_EXIT_CODE, sample as _sample  # noqa: F401

_WDT_MAX_MS = const(8388)
_ETIMEDOUT = const(110)
_EHOSTUNREACH = const(113)
#: The chip's reset-reason register, kept on the flash directory so that it survives the process ending with the reset.
_RESET_REGISTER = ".sim_reset_register"

_RTC_BOOT_EPOCH_S = const(1609459200)  # rp2 MicroPython sets the RTC to 2021-01-01 00:00:00 at boot


class Board:
    """The whole simulated device. Volatile parts are rebuilt by boot(); the flash directory, the I2C sensors, the ADC
    signals and the Wi-Fi environment (scripts, access point) are outside the chip and survive a reset."""

    #: Pin transitions kept for tests (oldest dropped first): enough for relay interlock proofs, bounded for long sims.
    max_pin_events = 256

    def __init__(self, flash_root=None, clock="real", devices=True, port_map=None):
        self._flash_root = flash_root or os.getenv("PICOIOT_FLASH") or "flash"
        self.port_map = port_map or {}  # board port -> host port (hal.listen_port): port 80 is privileged on a host
        self._flash_ready = False
        self.manual_clock = clock == "manual"
        self._now = 0           # manual clock
        self._offset = 0        # real clock + offset (advance() moves it)
        self.reset_count = 0    # boots after a simulated reset since configure()
        self.last_reset = None
        self.adc = {}           # ADC channel -> script (channel 4 unscripted: a slowly drifting room temperature)
        self._i2c = None
        self._default_devices = devices
        self.wlan = _WLAN(self)
        self._volatile()

    def _volatile(self):
        base.boots[0] += 1
        self.boot_id = base.boots[0]
        self._sleepers = []     # (wake-up tick, asyncio.Event) of pending vsleep() calls
        self.pins = {}          # id -> [mode, value, pull, irq handler, irq trigger]
        self._events = []       # pin transitions in order, packed (see _pin_event); read them as pin_events
        self.pin_events_dropped = 0
        self.wdt_timeout = None
        self.wdt_last_feed = 0
        self.wdt_feeds = 0
        self.rtc_epoch_ms = _RTC_BOOT_EPOCH_S * 1000
        self.rtc_set_at = self.now_ms()
        self.wlan._power_on()

    # ---- flash ----
    @property
    def flash_root(self):
        if not self._flash_ready:
            from iotlib import fsutil
            fsutil.makedirs(self._flash_root)
            self._flash_ready = True
        return self._flash_root

    def unique_id(self):
        import hashlib
        return hashlib.sha256(self._flash_root.encode()).digest()[:8]

    # ---- clock ----
    def now_ms(self):
        """The board's tick count in ms: real ticks + whatever advance() added, or a manual clock."""
        if self.manual_clock:
            return self._now
        return ticks_add(ticks_ms(), self._offset)

    def advance(self, ms):
        """Move the board's clock forward by ms without waiting. A WDT that starves on the way fires at its
        deadline (the clock stops at the first ms past it), not at the end of the jump."""
        left = self.wdt_remaining_ms()
        if left is not None and ms > left + 1:
            ms = left + 1 if left >= 0 else 0
        if self.manual_clock:
            self._now = ticks_add(self._now, ms)
        else:
            self._offset += ms
        self.wdt_check()

    async def vsleep(self, ms):
        """asyncio sleep on the board's clock: resumes when run_for() has moved the clock past it. Inject it as a
        manager's sleep_ms and minutes of device time pass in milliseconds of test time, in the right order."""
        from iotlib.compat import asyncio
        ev = asyncio.Event()
        self._sleepers.append((ticks_add(self.now_ms(), ms), ev))
        await ev.wait()

    async def run_for(self, ms, settle=10):
        """Drive the board's clock forward by ms: jump to the next vsleep() wake-up, wake it, let the woken tasks
        run (`settle` event-loop passes), repeat. A starved WDT raises SimulatedReset from here."""
        from iotlib.compat import asyncio
        end = ticks_add(self.now_ms(), ms)
        while True:
            for _ in range(settle):
                await asyncio.sleep(0)
            now = self.now_ms()
            nxt = None
            woke = False
            for s in self._sleepers[:]:
                d = ticks_diff(s[0], now)
                if d <= 0:
                    self._sleepers.remove(s)
                    s[1].set()
                    woke = True
                elif nxt is None or d < nxt:
                    nxt = d
            if woke:
                continue
            left = ticks_diff(end, now)
            if left <= 0:
                return
            self.advance(left if nxt is None or nxt > left else nxt)

    # ---- reset / boot ----
    def reset(self, cause):
        """Reset the chip ("hard", "soft" or "watchdog"): the cause goes into the reset-reason register (read by
        reset_cause() at the next boot), then SimulatedReset ends everything running."""
        self.last_reset = cause
        try:
            from iotlib import fsutil
            fsutil.write_atomic(self.flash_root + "/" + _RESET_REGISTER, cause)
        except OSError:
            pass  # a full flash must not stop a reset
        raise SimulatedReset(cause)

    def reset_cause(self):
        """The reset-reason register, as machine.reset_cause() reads it on a board: what the last reset was, or
        "power_on". Reading clears it, so the next power cycle is not mistaken for it."""
        path = self.flash_root + "/" + _RESET_REGISTER
        try:
            with open(path) as f:
                cause = f.read().strip()
            os.remove(path)
        except OSError:
            cause = None
        return cause or "power_on"

    def boot(self):
        """Power the simulated chip up again after a SimulatedReset: pins, WDT, RTC and the Wi-Fi chip start fresh;
        hal.reset_cause() reads the cause the reset left (a new boot_id tells hal it is a new boot)."""
        self.reset_count += 1
        self._volatile()

    # ---- watchdog ----
    def wdt_start(self, timeout_ms):
        if timeout_ms > _WDT_MAX_MS:
            raise ValueError("WDT timeout %d ms above the RP2040 maximum of 8388 ms" % timeout_ms)
        if timeout_ms < 1:
            raise ValueError("WDT timeout must be at least 1 ms")
        self.wdt_timeout = timeout_ms
        self.wdt_last_feed = self.now_ms()

    def wdt_feed(self):
        self.wdt_check()  # too late: the chip has already reset
        self.wdt_last_feed = self.now_ms()
        self.wdt_feeds += 1

    def wdt_check(self, now_ms=None):
        """Reset the device (SimulatedReset, cause "watchdog") if the WDT has gone unfed past its timeout."""
        if self.wdt_timeout is None:
            return
        now = self.now_ms() if now_ms is None else now_ms
        if ticks_diff(now, self.wdt_last_feed) > self.wdt_timeout:
            self.wdt_timeout = None  # the chip is gone; a caught SimulatedReset must not fire again before boot()
            self.reset("watchdog")

    def wdt_remaining_ms(self):
        if self.wdt_timeout is None:
            return None
        return self.wdt_timeout - ticks_diff(self.now_ms(), self.wdt_last_feed)

    # ---- pins ----
    def _pin_event(self, pid, level):
        ev = self._events
        if len(ev) >= self.max_pin_events:
            ev.pop(0)
            self.pin_events_dropped += 1
        ms = self.now_ms()
        if isinstance(pid, int) and 0 <= pid < 64 and 0 <= ms < 0x40000000:
            ev.append(ms << 7 | pid << 1 | level)  # one small int, not a 3-tuple: 256 events cost 2K, not 16K
        else:
            ev.append((ms, pid, level))

    @property
    def pin_events(self):
        """The pin transitions kept (at most max_pin_events, oldest first) as (ms, pin id, level) tuples."""
        return [e if isinstance(e, tuple) else (e >> 7, e >> 1 & 63, e & 1) for e in self._events]

    def pin_value(self, pid):
        st = self.pins.get(pid)
        return st[1] if st else None

    def drive(self, pid, level):
        """Drive an input pin from outside (a button, a sensor line); runs its irq handler like the hardware would."""
        st = self.pins.get(pid)
        if st is None:
            st = self.pins[pid] = [Pin.IN, 0, None, None, 0]
        level = 1 if level else 0
        old = st[1]
        st[1] = level
        if old != level:
            self._pin_event(pid, level)
            if st[3] is not None:
                trig = Pin.IRQ_RISING if level else Pin.IRQ_FALLING
                if st[4] & trig:
                    st[3](Pin(pid))

    def first_overlap(self, pins, level=1):
        """The first pin event after which every one of `pins` was at `level` at once (e.g. two interlocked relays
        both on), or None. Replays the transition log, so it sees overlaps that lasted no time at all."""
        state = {}
        for e in self.pin_events:
            state[e[1]] = e[2]
            if all(state.get(p) == level for p in pins):
                return e
        return None

    def events_of(self, pid):
        return [e for e in self.pin_events if e[1] == pid]

    def __getattr__(self, name):
        # The ADC, I2C and RTC parts of the board (set_adc, set_adc_volts, set_temperature, read_adc, i2c, attach,
        # detach, rtc_now_ms) live in picosim.periph, loaded on first use like the peripherals themselves: a device that
        # only switches pins never pays for their code and names.
        sim_io = _sub("periph")
        if name == "i2c":
            return sim_io.board_i2c(self)
        f = sim_io.BOARD.get(name)
        if f is None:
            raise AttributeError(name)
        return lambda *a, **kw: f(self, *a, **kw)


# ---------------------------------------------------------------- machine.Pin
class Pin:
    IN = const(0)
    OUT = const(1)
    OPEN_DRAIN = const(2)
    PULL_UP = const(1)
    PULL_DOWN = const(2)
    IRQ_FALLING = const(4)
    IRQ_RISING = const(8)

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.init(mode, pull, value)

    def init(self, mode=-1, pull=-1, value=None):
        pins = board.pins
        st = pins.get(self.id)
        if st is None:
            level = 1 if pull == Pin.PULL_UP else 0
            st = pins[self.id] = [Pin.IN, level, None, None, 0]
            board._pin_event(self.id, level)  # the log starts with every pin's first level
        if mode != -1:
            st[0] = mode
        if pull != -1:
            st[2] = pull
        if value is not None:
            self.value(value)

    def value(self, v=None):
        st = board.pins[self.id]
        if v is None:
            return st[1]
        v = 1 if v else 0
        if st[1] != v:
            st[1] = v
            board._pin_event(self.id, v)
        return None

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def high(self):
        self.value(1)

    def low(self):
        self.value(0)

    def toggle(self):
        self.value(1 - board.pins[self.id][1])

    def irq(self, handler=None, trigger=IRQ_FALLING | IRQ_RISING):
        st = board.pins[self.id]
        st[3] = handler
        st[4] = trigger

    def __repr__(self):
        return "Pin(%r)" % (self.id,)


# ---------------------------------------------------------------- network.WLAN
class _WLAN:
    """The Pico W's station interface. Each connect() takes the next scripted attempt (a list of statuses that
    successive status() calls step through, the last one sticking), or `fallback` when none is scripted, or what the
    configured access point says (-2 unknown SSID, -3 wrong password). `kill_link()` makes the link die silently:
    status() stays 3 and isconnected() True, but check_io() (what the clients call before I/O) fails."""

    PM_NONE = const(0xA11140)
    PM_PERFORMANCE = const(0xA11142)
    PM_POWERSAVE = const(0x111022)

    def __init__(self, board):
        self._board = board
        self.attempts = []          # scripted connect attempts, each a list of statuses
        self.fallback = [1, 2, 3]   # what an unscripted connect does: join, DHCP, up
        self.ap = None              # (ssid, password) the simulated access point accepts; None accepts anything
        self.rssi = -58             # dBm; number, list or callable
        self.heal_on_reconnect = True
        self.ip = "192.168.4.23"
        self.connects = []          # SSIDs of every connect() call (never the password)
        self.config_log = []        # every config(key=value) set, in order

    def _power_on(self):
        self._active = False
        self._status = 0
        self._seq = []
        self.link_dead = False
        self._cfg = {"pm": self.PM_PERFORMANCE, "mac": b"\x28\xcd\xc1\x00\x00\x01", "hostname": "PicoW",
                     "ssid": "", "channel": 0, "txpower": 31, "security": 0}

    # -- test scripting --
    def script(self, *attempts):
        """Queue connect attempts: script([1, -2], [1, 2, 3]) = first attempt finds no AP, the second works.
        An exception instance instead of a list is raised by that connect() call."""
        for a in attempts:
            self.attempts.append(a if isinstance(a, BaseException) else list(a))

    def drop(self, status=-1):
        """The link goes down visibly (AP gone, deauth): isconnected() False, status() as given."""
        self._status = status
        self._seq = []

    def kill_link(self):
        """Silent link death (micropython#16290): everything looks connected, no packet gets through."""
        self.link_dead = True

    def check_io(self):
        if not self._active or self._status != 3:
            raise OSError(_EHOSTUNREACH)
        if self.link_dead:
            raise OSError(_ETIMEDOUT)

    # -- network.WLAN API --
    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)
        if not on:
            self._status = 0
            self._seq = []
            if self.heal_on_reconnect:
                self.link_dead = False

    def connect(self, ssid=None, key=None, bssid=None):
        if not self._active:
            raise OSError("WLAN not active")
        self.connects.append(ssid)
        self._cfg["ssid"] = ssid
        if self.heal_on_reconnect:
            self.link_dead = False
        if self.attempts:
            seq = self.attempts.pop(0)
            if isinstance(seq, BaseException):
                raise seq
        elif self.ap is not None and ssid != self.ap[0]:
            seq = [1, -2]
        elif self.ap is not None and key != self.ap[1]:
            seq = [1, -3]
        else:
            seq = list(self.fallback)
        self._status = 1
        self._seq = seq

    def disconnect(self):
        self._status = 0
        self._seq = []
        if self.heal_on_reconnect:
            self.link_dead = False

    def status(self, param=None):
        if param == "rssi":
            return _sample(self.__dict__, "rssi", self._board.now_ms())
        if param is not None:
            raise ValueError("unknown status param")
        if self._seq:
            self._status = self._seq.pop(0)  # the last scripted status then sticks
        return self._status

    def isconnected(self):
        return self._active and self._status == 3

    def ifconfig(self, cfg=None):
        if self.isconnected():
            return (self.ip, "255.255.255.0", "192.168.4.1", "192.168.4.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def ipconfig(self, key):
        if key == "addr4":
            c = self.ifconfig()
            return (c[0], c[1])
        raise ValueError("unknown ipconfig key")

    def config(self, *args, **kw):
        if args:
            if args[0] not in self._cfg:
                raise ValueError("unknown config param")
            return self._cfg[args[0]]
        for k in kw:
            if k not in self._cfg:
                raise ValueError("unknown config param")
            self._cfg[k] = kw[k]
            self.config_log.append((k, kw[k]))

    def scan(self):
        if not self._active:
            raise OSError("WLAN not active")
        ssid = self.ap[0] if self.ap else "picoiot-sim"
        return [(ssid.encode(), b"\x02\x00\x00\x00\x00\x01", 6, self.status("rssi"), 3, False)]


def WLAN(interface=0):
    """network.WLAN: the board's one station interface (the access-point interface is not simulated)."""
    if interface != 0:
        raise ValueError("only the station interface (STA_IF) is simulated")
    return board.wlan


# ---------------------------------------------------------------- machine.WDT
class WDT:
    """machine.WDT on the simulated board: ValueError above the RP2040's 8388 ms; once started it cannot be stopped
    (until the next boot). Starving it past its timeout resets the device: the next feed(), check() or
    board.advance() raises SimulatedReset("watchdog") and leaves "watchdog" as the reset cause on flash."""

    def __init__(self, id=0, timeout=5000):
        board.wdt_start(timeout)

    def feed(self):
        board.wdt_feed()

    def check(self, now_ms=None):
        """Simulation only (a real WDT needs no help): fire now if starved. WatchdogManager calls it every tick."""
        board.wdt_check(now_ms)


board = Board()
base.current[0] = board


def __getattr__(name):
    # Loaded on first use: the sensor models live in picosim.i2c (picosim.BME280 etc. work), the ADC, I2C and RTC
    # peripherals and the RP2040 temperature conversions in picosim.periph.
    if name in ("I2CDevice", "BME280", "SHT3x"):
        return getattr(_sub("i2c"), name)
    if name in ("ADC", "I2C", "RTC", "temp_to_u16", "u16_to_temp"):
        return getattr(_sub("periph"), name)
    if name in ("base", "periph", "i2c"):  # MicroPython routes `from picosim import periph` through here
        return _sub(name)
    raise AttributeError(name)


def _sub(name):
    return __import__("picosim." + name, None, None, [name])


def configure(flash_root=None, clock="real", devices=True, port_map=None):
    """Start a fresh simulated board (the tests' set-up): flash_root (default $PICOIOT_FLASH or ./flash), clock
    "real" (host ticks, advance() adds to them) or "manual" (only advance() moves it), and with `devices` the
    default sensors: a BME280 at 0x76 and an SHT3x at 0x44 on I2C bus 0. port_map {board port: host port}: where
    the board's listening ports are on the host (a controller's default port 80 is privileged there). Returns the
    board."""
    global board
    board = base.current[0] = Board(flash_root, clock, devices, port_map)
    return board


def boot():
    board.boot()
    return board
