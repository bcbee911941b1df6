# I2C sensor models of the simulated board (picosim), register/command level: enough for a real driver to read
# temperature, humidity and pressure, with scriptable values and faults. Loaded only when a simulated I2C bus is used.
from iotlib.compat import const
from picosim import base

_EIO = const(5)


class I2CDevice:
    """Base of the sensor models: scripted field values, `present` (False = the address NACKs: unplugged), and
    `fail(exc, count)` to make the next `count` bus transactions raise (default OSError(EIO), a NACK mid-transfer)."""

    def __init__(self, addr, **values):
        self.addr = addr
        self.present = True
        self.values = {}
        self.transactions = 0
        self._faults = []
        self.set(**values)

    def set(self, **values):
        self.values.update(values)

    def fail(self, exc=None, count=1):
        for _ in range(count):
            self._faults.append(exc if exc is not None else OSError(_EIO))

    def _tx(self):
        self.transactions += 1
        if self._faults:
            raise self._faults.pop(0)

    def value(self, name):
        return base.sample(self.values, name, base.current[0].now_ms())


def _crc8(data):
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SHT3x(I2CDevice):
    """Sensirion SHT3x at 0x44/0x45, command level: single-shot (0x24xx, 0x2Cxx), periodic (0x2xxx) + fetch (0xE000),
    break, soft reset, status, heater; 6-byte answers with CRC-8. Fields: temperature (°C), humidity (%RH).
    `corrupt_crc = True` makes every answer fail its CRC check. Reading with no measurement pending NACKs."""

    def __init__(self, addr=0x44, temperature=22.0, humidity=45.0):
        super().__init__(addr, temperature=temperature, humidity=humidity)
        self.corrupt_crc = False
        self.heater = False
        self.periodic = False
        self.commands = []   # every command word received, in order
        self._pending = None

    def _word(self, w):
        b = bytes([w >> 8, w & 0xFF])
        crc = _crc8(b)
        if self.corrupt_crc:
            crc ^= 0x5A
        return b + bytes([crc])

    def _measure(self):
        t = self.value("temperature")
        h = self.value("humidity")
        st = int((t + 45) * 65535 / 175 + 0.5)
        sh = int(h * 65535 / 100 + 0.5)
        st = 0 if st < 0 else 65535 if st > 65535 else st
        sh = 0 if sh < 0 else 65535 if sh > 65535 else sh
        return self._word(st) + self._word(sh)

    def write(self, data):
        if len(data) < 2:
            raise OSError(_EIO)
        cmd = (data[0] << 8) | data[1]
        self.commands.append(cmd)
        hi = cmd >> 8
        if hi in (0x24, 0x2C):
            self._pending = self._measure()
        elif cmd == 0xE000:
            self._pending = self._measure() if self.periodic else None
        elif 0x20 <= hi <= 0x27:
            self.periodic = True
        elif cmd == 0x3093:
            self.periodic = False
        elif cmd == 0x30A2:
            self.periodic = self.heater = False
            self._pending = None
        elif cmd == 0xF32D:
            self._pending = self._word(0x2000 if self.heater else 0)
        elif cmd == 0x306D:
            self.heater = True
        elif cmd == 0x3066:
            self.heater = False
        elif cmd == 0x3041:
            pass
        else:
            raise OSError(_EIO)  # the sensor NACKs an unknown command

    def read(self, n):
        if self._pending is None:
            raise OSError(_EIO)
        data = self._pending[:n]
        self._pending = None
        return data


class BME280(I2CDevice):
    """Bosch BME280 at 0x76/0x77, register level: chip id 0xD0 = 0x60, reset 0xE0, ctrl_hum 0xF2 (takes effect on the
    next ctrl_meas write, as the datasheet says), status 0xF3, ctrl_meas 0xF4 (sleep / forced / normal), config 0xF5,
    data 0xF7..0xFE, calibration 0x88..0xA1 and 0xE1..0xE7. Raw ADC values are found by inverting the datasheet's
    integer compensation, so a driver using those formulas reads back the scripted temperature (°C), pressure (Pa)
    and humidity (%RH). A disabled channel (oversampling 0) reads 0x80000 / 0x8000, like the chip."""

    # Calibration words (the datasheet's worked example for T and P, a real part's for H).
    CAL_T = (27504, 26435, -1000)
    CAL_P = (36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
    CAL_H = (75, 362, 0, 313, 50, 30)

    def __init__(self, addr=0x76, temperature=21.5, pressure=101325.0, humidity=40.0):
        super().__init__(addr, temperature=temperature, pressure=pressure, humidity=humidity)
        self.regs = bytearray(256)
        self._ptr = 0
        self._hum_pending = 0
        self.measurements = 0
        self._power_on()

    def _power_on(self):
        r = self.regs
        for i in range(256):
            r[i] = 0
        r[0xD0] = 0x60
        i = 0x88
        for k, v in enumerate(self.CAL_T + self.CAL_P):
            v &= 0xFFFF
            r[i] = v & 0xFF
            r[i + 1] = v >> 8
            i += 2
        h1, h2, h3, h4, h5, h6 = self.CAL_H
        r[0xA1] = h1
        r[0xE1] = h2 & 0xFF
        r[0xE2] = (h2 >> 8) & 0xFF
        r[0xE3] = h3
        r[0xE4] = (h4 >> 4) & 0xFF
        r[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        r[0xE6] = (h5 >> 4) & 0xFF
        r[0xE7] = h6 & 0xFF
        r[0xF7:0xFF] = b"\x80\x00\x00\x80\x00\x00\x80\x00"
        self._hum_pending = 0

    def write(self, data):
        if not data:
            return
        self._ptr = data[0]
        # Writes are (register, value) pairs; auto-increment is for reads only.
        i = 1
        reg = data[0]
        while i < len(data):
            self._write_reg(reg, data[i])
            if i + 1 < len(data):
                reg = data[i + 1]
            i += 2

    def _write_reg(self, reg, v):
        r = self.regs
        if reg == 0xE0:
            if v == 0xB6:
                self._power_on()
        elif reg == 0xF2:
            self._hum_pending = v & 7
        elif reg == 0xF4:
            r[0xF2] = self._hum_pending
            r[0xF4] = v
            if v & 3 in (1, 2):  # forced: one measurement, then back to sleep
                self._measure()
                r[0xF4] = v & 0xFC
        elif reg == 0xF5:
            r[0xF5] = v

    def read(self, n):
        p = self._ptr
        if self.regs[0xF4] & 3 == 3 and p <= 0xFE and p + n > 0xF7:
            self._measure()  # normal mode: always a fresh sample
        data = bytes(self.regs[p:p + n])
        self._ptr = p + n
        return data

    # Datasheet compensation, integer versions (Python's >> is the arithmetic shift the datasheet assumes).
    def _t_fine(self, adc_t):
        t1, t2, t3 = self.CAL_T
        v1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
        d = (adc_t >> 4) - t1
        v2 = (((d * d) >> 12) * t3) >> 14
        return v1 + v2

    def _press(self, adc_p, t_fine):
        p1, p2, p3, p4, p5, p6, p7, p8, p9 = self.CAL_P
        v1 = t_fine - 128000
        v2 = v1 * v1 * p6 + ((v1 * p5) << 17) + (p4 << 35)
        v1 = ((v1 * v1 * p3) >> 8) + ((v1 * p2) << 12)
        v1 = (((1 << 47) + v1) * p1) >> 33
        if v1 == 0:
            return 0
        p = 1048576 - adc_p
        num = ((p << 31) - v2) * 3125
        p = num // v1 if num >= 0 else -((-num) // v1)  # C division truncates
        v1 = (p9 * (p >> 13) * (p >> 13)) >> 25
        v2 = (p8 * p) >> 19
        return ((p + v1 + v2) >> 8) + (p7 << 4)  # Pa * 256

    def _hum(self, adc_h, t_fine):
        h1, h2, h3, h4, h5, h6 = self.CAL_H
        v = t_fine - 76800
        v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * \
            (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
        v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
        v = 0 if v < 0 else 419430400 if v > 419430400 else v
        return v >> 12  # %RH * 1024

    @staticmethod
    def _search(f, target, hi, rising):
        # smallest raw value whose compensated reading reaches the target (compensation is monotonic)
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            y = f(mid)
            if (y >= target) if rising else (y <= target):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _measure(self):
        self.measurements += 1
        r = self.regs
        ctrl = r[0xF4]
        osrs_t, osrs_p, osrs_h = ctrl >> 5, (ctrl >> 2) & 7, r[0xF2] & 7
        t = self.value("temperature")
        adc_t = self._search(lambda a: (self._t_fine(a) * 5 + 128) >> 8, int(t * 100 + 0.5), 0xFFFFF, True)
        t_fine = self._t_fine(adc_t)
        if not osrs_t:
            adc_t = 0x80000
        adc_p = 0x80000
        if osrs_p:
            p = self.value("pressure")
            adc_p = self._search(lambda a: self._press(a, t_fine), int(p * 256), 0xFFFFF, False)
        adc_h = 0x8000
        if osrs_h:
            h = self.value("humidity")
            adc_h = self._search(lambda a: self._hum(a, t_fine), int(h * 1024 + 0.5), 0xFFFF, True)
        r[0xF7] = adc_p >> 12
        r[0xF8] = (adc_p >> 4) & 0xFF
        r[0xF9] = (adc_p & 0xF) << 4
        r[0xFA] = adc_t >> 12
        r[0xFB] = (adc_t >> 4) & 0xFF
        r[0xFC] = (adc_t & 0xF) << 4
        r[0xFD] = adc_h >> 8
        r[0xFE] = adc_h & 0xFF
