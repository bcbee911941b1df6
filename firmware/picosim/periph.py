# The ADC, I2C and RTC of the simulated board (picosim), loaded on first use: `picosim.ADC`, `.I2C`, `.RTC`,
# `hal.ADC`… and the board's ADC/I2C/RTC methods (`board.set_adc`, `.set_temperature`, `.i2c`, `.attach`…) load it.
# A device that only switches pins (the RelaysController) never pays for this code and its names.
from iotlib.compat import const, ticks_diff
from picosim import base
from picosim.base import sample as _sample

_EIO = const(5)  # what rp2 raises when an I2C address or byte is not acknowledged


# ---- RP2040 internal temperature sensor (ADC channel 4): the datasheet's conversion, both ways ----
def temp_to_u16(celsius):
    volts = 0.706 - (celsius - 27) * 0.001721
    return _volts_to_u16(volts)


def u16_to_temp(u16):
    return 27 - (u16 * 3.3 / 65535 - 0.706) / 0.001721


def _volts_to_u16(volts):
    raw12 = int(volts / 3.3 * 4095 + 0.5)
    raw12 = 0 if raw12 < 0 else 4095 if raw12 > 4095 else raw12
    return (raw12 << 4) | (raw12 >> 8)  # how the rp2 port scales its 12-bit reading to 16 bits


def _default_temperature(now):
    import math
    return 24.0 + 1.5 * math.sin(now / 95493.0)  # a slow ±1.5 °C drift over ~10 minutes


# ---- civil dates for the RTC (UTC; Howard Hinnant's algorithms) ----
def _days_from_civil(y, m, d):
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _civil_from_days(z):
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def _map(value, fn):
    if isinstance(value, list):
        return [v if isinstance(v, BaseException) else fn(v) for v in value]
    if callable(value):
        return lambda now: fn(value(now))
    return fn(value)


def _default_temperature_u16(now):
    return temp_to_u16(_default_temperature(now))



# ---------------------------------------------------------------- the board's ADC, I2C and RTC (picosim.Board.__getattr__)
def set_adc(board, channel, value):
    """Script an ADC channel in raw read_u16 units (number, list or callable)."""
    board.adc[channel] = value


def set_adc_volts(board, channel, volts):
    board.adc[channel] = _map(volts, _volts_to_u16)


def set_temperature(board, celsius):
    """Script the RP2040 internal sensor (ADC 4) in °C (number, list or callable); reads see the real conversion."""
    board.adc[4] = _map(celsius, temp_to_u16)


def read_adc(board, channel):
    if channel not in board.adc:
        return _default_temperature_u16(board.now_ms()) if channel == 4 else 0
    return _sample(board.adc, channel, board.now_ms())


def board_i2c(board):
    """{bus: {address: device model}}; the default sensors are put on bus 0 at first use."""
    if board._i2c is None:
        board._i2c = {0: {}, 1: {}}
        if board._default_devices:
            from picosim import i2c as sim_i2c
            attach(board, sim_i2c.BME280())
            attach(board, sim_i2c.SHT3x())
    return board._i2c


def attach(board, device, bus=0):
    """Put an I2C device model on a bus (replacing one at the same address)."""
    board_i2c(board).setdefault(bus, {})[device.addr] = device
    return device


def detach(board, addr, bus=0):
    board_i2c(board).get(bus, {}).pop(addr, None)


def rtc_now_ms(board):
    return board.rtc_epoch_ms + ticks_diff(board.now_ms(), board.rtc_set_at)


BOARD = {"set_adc": set_adc, "set_adc_volts": set_adc_volts, "set_temperature": set_temperature,
         "read_adc": read_adc, "attach": attach, "detach": detach, "rtc_now_ms": rtc_now_ms}


# ---------------------------------------------------------------- machine.ADC
class ADC:
    CORE_TEMP = const(4)

    def __init__(self, pin):
        pin = getattr(pin, "id", pin)  # a Pin (picosim.Pin) or its number
        if isinstance(pin, int) and 26 <= pin <= 29:
            pin -= 26  # GPIO26..29 are ADC0..3
        if not isinstance(pin, int) or not 0 <= pin <= 4:
            raise ValueError("invalid ADC channel %r" % (pin,))
        self.channel = pin

    def read_u16(self):
        return read_adc(base.current[0], self.channel)


# ---------------------------------------------------------------- machine.I2C and device models
class I2C:
    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        if id not in (0, 1):
            raise ValueError("I2C(%r) doesn't exist" % (id,))
        self.id = id
        self.freq = freq

    def _dev(self, addr):
        d = board_i2c(base.current[0]).get(self.id, {}).get(addr)
        if d is None or not d.present:
            raise OSError(_EIO)  # what rp2 raises when nobody ACKs the address
        d._tx()
        return d

    def scan(self):
        return sorted(a for a, d in board_i2c(base.current[0]).get(self.id, {}).items() if d.present)

    def writeto(self, addr, buf, stop=True):
        self._dev(addr).write(bytes(buf))
        return len(buf)

    def writevto(self, addr, vector, stop=True):
        data = b"".join(bytes(b) for b in vector)
        self._dev(addr).write(data)
        return len(data)

    def readfrom(self, addr, nbytes, stop=True):
        return self._dev(addr).read(nbytes)

    def readfrom_into(self, addr, buf, stop=True):
        data = self._dev(addr).read(len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self._dev(addr).write(bytes([memaddr]) + bytes(buf))

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        d = self._dev(addr)
        d.write(bytes([memaddr]))
        return d.read(nbytes)

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        data = self.readfrom_mem(addr, memaddr, len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]


class RTC:
    def datetime(self, dt=None):
        """(year, month, day, weekday, hours, minutes, seconds, subseconds), UTC, weekday 0 = Monday."""
        if dt is not None:
            y, mo, d, _wd, h, mi, s = dt[:7]
            base.current[0].rtc_epoch_ms = ((_days_from_civil(y, mo, d) * 86400) + h * 3600 + mi * 60 + s) * 1000
            base.current[0].rtc_set_at = base.current[0].now_ms()
            return None
        ms = rtc_now_ms(base.current[0])
        secs = ms // 1000
        days = secs // 86400
        rem = secs - days * 86400
        y, mo, d = _civil_from_days(days)
        return (y, mo, d, (days + 3) % 7, rem // 3600, rem // 60 % 60, rem % 60, 0)
