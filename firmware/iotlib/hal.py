# The hardware boundary: the only iotlib module that touches `machine`/`network`.
# On a Pico W it hands out the real classes; anywhere else (the unix port's `machine` is nearly empty and it has no
# `network`; CPython has neither) it hands out the simulated board of `picosim`, test equipment that a board bundle
# does not contain. Feature detection, not platform checks.
from iotlib.compat import const, ticks_diff

try:
    import machine as _machine
    import network as _network
    # What a Pico W has and the unix port lacks: a real WLAN driver, a watchdog, ADC and I2C peripherals.
    for _name in ("WDT", "ADC", "I2C", "Pin", "RTC", "reset", "unique_id"):
        getattr(_machine, _name)
    _network.WLAN
    SIMULATED = False
except (ImportError, AttributeError):
    SIMULATED = True

# cyw43 link status codes, as WLAN.status() returns them on a Pico W (network.STAT_* where the port defines them).
STAT_IDLE = const(0)            # CYW43_LINK_DOWN: not connected, not trying
STAT_CONNECTING = const(1)      # CYW43_LINK_JOIN: joining the AP
STAT_NO_IP = const(2)           # CYW43_LINK_NOIP: joined, waiting for DHCP
STAT_GOT_IP = const(3)          # CYW43_LINK_UP: connected with an address
STAT_CONNECT_FAIL = const(-1)   # CYW43_LINK_FAIL
STAT_NO_AP_FOUND = const(-2)    # CYW43_LINK_NONET
STAT_WRONG_PASSWORD = const(-3)  # CYW43_LINK_BADAUTH

#: The RP2040's watchdog counts 24 bits of microseconds ticked twice (an erratum): 0x7FFFFF us = 8388 ms is the most.
WDT_MAX_MS = const(8388)

_CAUSE_FILE = ".reset_cause"   # written just before a reset we cause, read (and removed) at the next boot
_cause = [None, None]          # this boot's reset cause once read, and the boot it was read in

if SIMULATED:
    import picosim as _sim
    from picosim import Pin, WLAN, WDT, SimulatedReset  # noqa: F401
    STA_IF = 0
    AP_IF = 1

    def __getattr__(name):
        # ADC, I2C and RTC come from picosim.periph, loaded on first use (a relays device never needs them)
        if name in ("ADC", "I2C", "RTC"):
            return getattr(_sim, name)
        raise AttributeError(name)

    def reset():
        _record_cause("hard")
        _sim.board.reset("hard")

    def soft_reset():
        _record_cause("soft")
        _sim.board.reset("soft")

    def ticks_ms():
        """Milliseconds on the board's clock (the simulated clock can be advanced by tests)."""
        return _sim.board.now_ms()

    def flash_root():
        return _sim.board.flash_root

    def unique_id():
        return _sim.board.unique_id()

    def link_check():
        """Raise OSError if the (simulated) Wi-Fi link cannot carry traffic; the HTTP/SNTP clients call this before
        each exchange so that a silently dead link in simulation fails like it does on a board."""
        _sim.board.wlan.check_io()

    def _hw_cause():
        return _sim.board.reset_cause()

    def _boot_id():
        return _sim.board.boot_id  # a test may boot the simulated board again in the same process

    def sha1(data):
        """hashlib.sha1 for a port built without it (the simulated board supplies it; a Pico W has it built in)."""
        from picosim.sha1 import sha1
        return sha1(data)

    def rtc_ms():
        """Epoch ms on the simulated board's RTC (2021-01-01 at every boot, like rp2's)."""
        b = _sim.board
        return b.rtc_epoch_ms + ticks_diff(b.now_ms(), b.rtc_set_at)

    def set_rtc(ms):
        b = _sim.board
        b.rtc_epoch_ms = ms
        b.rtc_set_at = b.now_ms()

    def listen_port(port):
        """The host port standing in for the board's `port` (port 80 needs privileges on the host)."""
        return _sim.board.port_map.get(port, port)
else:
    Pin = _machine.Pin
    ADC = _machine.ADC
    I2C = _machine.I2C
    WLAN = _network.WLAN
    WDT = _machine.WDT
    RTC = _machine.RTC
    STA_IF = _network.STA_IF
    AP_IF = _network.AP_IF

    class SimulatedReset(SystemExit):  # never raised on a board; defined so `except hal.SimulatedReset` works
        pass

    def reset():
        _record_cause("hard")
        _machine.reset()

    def soft_reset():
        _record_cause("soft")
        _machine.soft_reset()

    from iotlib.compat import ticks_ms  # noqa: F401

    def flash_root():
        return ""

    def unique_id():
        return _machine.unique_id()

    def link_check():
        pass

    rtc_ms = None  # the port's time.time() reads the RTC

    def set_rtc(ms):
        import time
        t = time.gmtime(ms // 1000)
        _machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0))

    def listen_port(port):
        return port

    def _hw_cause():
        rc = _machine.reset_cause()
        if rc == getattr(_machine, "WDT_RESET", -100):
            return "watchdog"
        if rc == getattr(_machine, "PWRON_RESET", -100):
            return "power_on"
        if rc == getattr(_machine, "HARD_RESET", -100):
            return "hard"
        return "unknown"

    def _boot_id():
        return 0  # one boot per process on a board


def flash_path(name, root=None):
    """The path of a persistent file `name` under root (None: the flash root; "": the filesystem's root)."""
    root = (flash_root() if root is None else root).rstrip("/")
    return root + "/" + name if root else "/" + name


def _record_cause(cause):
    # Best effort: a reset must happen even if the flash is full.
    try:
        from iotlib import fsutil
        fsutil.write_atomic(flash_path(_CAUSE_FILE), cause)
    except OSError:
        pass


def reset_cause():
    """Why this boot happened: "power_on" | "watchdog" | "soft" | "hard" | "unknown". A reset that iotlib caused
    (hal.reset / hal.soft_reset) leaves its cause on flash; the first call of a boot reads and
    removes it, so the next power cycle is not mistaken for it. Later calls in the same boot give the same answer."""
    if _cause[0] is None or _cause[1] != _boot_id():
        cause = None
        path = flash_path(_CAUSE_FILE)
        try:
            with open(path) as f:
                cause = f.read().strip()
            import os
            os.remove(path)
        except OSError:
            pass
        hw = _hw_cause()
        # A board's own register knows watchdog resets best; our marker tells hard from soft (rp2 resets through the
        # watchdog, so machine.reset() alone would look like a WDT reset).
        _cause[0], _cause[1] = cause or hw, _boot_id()
    return _cause[0]
