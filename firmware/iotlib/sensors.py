# Sensor drivers (RP2040 internal temperature, ADC channels, BME280, SHT3x) and the SensorHub that samples the fields a
# config names, runs each through its filter chain and keeps the latest snapshot. A failing sensor publishes None and
# raises a warning (ESPHome style) instead of taking the device down; it is retried on every sample.
#
# Config section "sensors":
#   {"interval_ms": 1000,
#    "i2c": {"bus": 0, "sda": 4, "scl": 5, "freq": 400000, "bme280_address": 118, "sht3x_address": 68},
#    "fields": {"temperature": {"source": "bme280.temperature", "filters": [{"moving_average": 4}]},
#               "cpu_temp": {"source": "rp2040.temperature"}, "light": {"source": "adc0"}}}
# Sources: rp2040.temperature (°C), adc0-adc3 (volts; adc3 is VSYS/3 on a Pico W), bme280.temperature|humidity|pressure
# (°C, %RH, hPa), sht3x.temperature|humidity.
from iotlib.compat import const, asyncio, sleep_ms, ticks_ms, ticks_diff, ticks_add, epoch_ms


def _flt():
    # iotlib.filters is loaded only when some field has a filter: it costs heap, and the default config has none.
    from iotlib import filters
    return filters


def _check_chain(chain, path):
    if isinstance(chain, list) and not chain:
        return []
    return _flt().validate(chain, path)

_VREF = 3.3
_U16 = const(65535)


class SensorError(ValueError):
    pass


# --- drivers: read() is a coroutine returning {quantity: value}; raising OSError/ValueError marks the sensor failed ---
class InternalTemp:
    """RP2040 die temperature on ADC channel 4 (RP2040 datasheet §4.9.5: 27 °C at 0.706 V, -1.721 mV/°C)."""
    quantities = ("temperature",)

    def __init__(self, adc_factory):
        self.adc = adc_factory(4)

    async def read(self):
        v = self.adc.read_u16() * _VREF / _U16
        return {"temperature": round(27 - (v - 0.706) / 0.001721, 2)}


class ADCChannel:
    quantities = ("volts",)

    def __init__(self, adc_factory, ch):
        self.adc = adc_factory(ch)

    async def read(self):
        return {"volts": round(self.adc.read_u16() * _VREF / _U16, 4)}


def _s16(b, i):
    v = b[i] | (b[i + 1] << 8)
    return v - 65536 if v > 32767 else v


def _u16(b, i):
    return b[i] | (b[i + 1] << 8)


class BME280:
    """Bosch BME280 over I2C, normal mode, x1 oversampling, compensated with the datasheet's floating-point formulas
    (BME280 datasheet §8.1)."""
    quantities = ("temperature", "humidity", "pressure")
    CHIP_ID = const(0x60)

    def __init__(self, i2c, address=0x76):
        self.i2c = i2c
        self.addr = address
        self.cal = None

    def setup(self):
        chip = self.i2c.readfrom_mem(self.addr, 0xD0, 1)[0]
        if chip != self.CHIP_ID:
            raise ValueError("chip id 0x%02x is not a BME280" % chip)
        c = self.i2c.readfrom_mem(self.addr, 0x88, 26)
        h = self.i2c.readfrom_mem(self.addr, 0xE1, 7)
        e4, e5, e6 = h[3], h[4], h[5]
        h4 = (e4 << 4) | (e5 & 0x0F)
        h5 = (e6 << 4) | (e5 >> 4)
        self.cal = (_u16(c, 0), _s16(c, 2), _s16(c, 4),  # T1-T3
                    _u16(c, 6), _s16(c, 8), _s16(c, 10), _s16(c, 12), _s16(c, 14), _s16(c, 16), _s16(c, 18),
                    _s16(c, 20), _s16(c, 22),  # P1-P9
                    c[25], _s16(h, 0), h[2], h4 - 4096 if h4 > 2047 else h4, h5 - 4096 if h5 > 2047 else h5,
                    h[6] - 256 if h[6] > 127 else h[6])  # H1-H6
        self.i2c.writeto_mem(self.addr, 0xF2, b"\x01")  # humidity x1 (takes effect with the ctrl_meas write)
        self.i2c.writeto_mem(self.addr, 0xF5, b"\x00")  # standby 0.5 ms, filter off
        self.i2c.writeto_mem(self.addr, 0xF4, b"\x27")  # temperature x1, pressure x1, normal mode

    async def read(self):
        if self.cal is None:
            self.setup()
        d = self.i2c.readfrom_mem(self.addr, 0xF7, 8)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        if adc_t == 0x80000:  # the "skipped" marker: the sensor was reset and is not measuring
            self.cal = None
            raise OSError("BME280 not measuring")
        t_fine, t, p = compensate_tp(self.cal, adc_t, adc_p)
        return {"temperature": round(t, 2), "pressure": round(p / 100, 2),
                "humidity": round(compensate_h(self.cal, t_fine, adc_h), 2)}


def compensate_tp(cal, adc_t, adc_p):
    """(t_fine, °C, Pa) from raw readings and calibration (T1, T2, T3, P1…P9, …)."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = cal[:12]
    v1 = (adc_t / 16384.0 - t1 / 1024.0) * t2
    v2 = (adc_t / 131072.0 - t1 / 8192.0) * (adc_t / 131072.0 - t1 / 8192.0) * t3
    t_fine = v1 + v2
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * p6 / 32768.0
    v2 = v2 + v1 * p5 * 2.0
    v2 = v2 / 4.0 + p4 * 65536.0
    v1 = (p3 * v1 * v1 / 524288.0 + p2 * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * p1
    if v1 == 0:
        return t_fine, t_fine / 5120.0, 0.0
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    v1 = p9 * p * p / 2147483648.0
    v2 = p * p8 / 32768.0
    return t_fine, t_fine / 5120.0, p + (v1 + v2 + p7) / 16.0


def compensate_h(cal, t_fine, adc_h):
    h1, h2, h3, h4, h5, h6 = cal[12:18]
    h = t_fine - 76800.0
    h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * h)) * (h2 / 65536.0 * (1.0 + h6 / 67108864.0 * h *
                                                                       (1.0 + h3 / 67108864.0 * h)))
    h = h * (1.0 - h1 * h / 524288.0)
    return 0.0 if h < 0 else 100.0 if h > 100 else h


def crc8(data):
    """Sensirion CRC-8 (polynomial 0x31, init 0xFF): crc8(b"\\xbe\\xef") == 0x92."""
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SHT3x:
    """Sensirion SHT3x single-shot, high repeatability, CRC-checked (datasheet §4.4, §4.12)."""
    quantities = ("temperature", "humidity")
    #: Measurement time at high repeatability is 15.5 ms max; we yield to the loop while it converts.
    measure_ms = 16

    def __init__(self, i2c, address=0x44):
        self.i2c = i2c
        self.addr = address

    async def read(self):
        self.i2c.writeto(self.addr, b"\x24\x00")
        await sleep_ms(self.measure_ms)
        d = self.i2c.readfrom(self.addr, 6)
        if crc8(d[0:2]) != d[2] or crc8(d[3:5]) != d[5]:
            raise ValueError("SHT3x CRC mismatch")
        t = -45 + 175 * ((d[0] << 8) | d[1]) / 65535
        h = 100 * ((d[3] << 8) | d[4]) / 65535
        return {"temperature": round(t, 2), "humidity": round(h, 2)}


# --- the hub ---------------------------------------------------------------------------------------------------------
_DRIVERS = ("rp2040", "adc0", "adc1", "adc2", "adc3", "bme280", "sht3x")


def _split(source):
    if source == "rp2040.temperature":
        return "rp2040", "temperature"
    if source in ("adc0", "adc1", "adc2", "adc3"):
        return source, "volts"
    if "." in source:
        drv, q = source.split(".", 1)
        if drv == "bme280" and q in BME280.quantities or drv == "sht3x" and q in SHT3x.quantities:
            return drv, q
    return None, None


def validate(section):
    """Problems of a "sensors" config section, each as "sensors.<path>: problem"."""
    if not isinstance(section, dict):
        return ["sensors: must be an object"]
    errs = []
    iv = section.get("interval_ms", 1000)
    if not isinstance(iv, int) or isinstance(iv, bool) or not SensorHub.min_interval_ms <= iv <= 3600000:
        errs.append("sensors.interval_ms: must be an integer %d-3600000" % SensorHub.min_interval_ms)
    i2c = section.get("i2c", {})
    if not isinstance(i2c, dict):
        errs.append("sensors.i2c: must be an object")
    else:
        for k in i2c:
            v = i2c[k]
            if k not in ("bus", "sda", "scl", "freq", "bme280_address", "sht3x_address"):
                errs.append("sensors.i2c.%s: unknown field" % k)
            elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                errs.append("sensors.i2c.%s: must be an integer >= 0" % k)
    fields = section.get("fields")
    if not isinstance(fields, dict) or not fields:
        errs.append("sensors.fields: must be a non-empty object")
        return errs
    if len(fields) > SensorHub.max_fields:
        errs.append("sensors.fields: at most %d fields" % SensorHub.max_fields)
    for name in sorted(fields):
        f = fields[name]
        p = "sensors.fields." + name
        if not isinstance(f, dict):
            errs.append(p + ": must be an object")
            continue
        if _split(f.get("source") if isinstance(f.get("source"), str) else "")[0] is None:
            errs.append(p + ".source: unknown source %r" % (f.get("source"),))
        errs.extend(_check_chain(f.get("filters", []), p + ".filters"))
        for k in f:
            if k not in ("source", "filters", "unit"):
                errs.append("%s.%s: unknown field" % (p, k))
    return errs


# The control plane's "sensors" device type (src/picoiot/server/devicetypes.py) speaks of field names and per-field
# filter objects; this maps that shape onto the hub's section. Field names map to sources through sampling.sources
# (optional) or these defaults.
DEFAULT_SOURCES = {"temperature": "bme280.temperature", "humidity": "bme280.humidity", "pressure": "bme280.pressure",
                   "cpu_temp": "rp2040.temperature", "adc0": "adc0", "adc1": "adc1", "adc2": "adc2", "adc3": "adc3"}


def _filter_chain(name, spec, errs):
    # {"kind": "none"|"ema"|"median"|"deadband", "alpha", "window", "threshold"} and/or {"chain": [...]}: the kind
    # comes first, then the chain (calibrate, clamp, moving_average, delta, throttle_ms, …).
    p = "filters." + name
    if spec is None:
        return []
    if not isinstance(spec, dict):
        errs.append(p + ": must be an object")
        return []
    chain = []
    kind = spec.get("kind", "none")
    if kind == "ema":
        chain.append({"ema": spec.get("alpha", 0.5)})
    elif kind == "median":
        chain.append({"median": spec.get("window", 5)})
    elif kind == "deadband":
        chain.append({"delta": spec.get("threshold", 0)})
    elif kind != "none":
        errs.append(p + ".kind: must be one of none, ema, median, deadband")
    for e in _check_chain(chain, p):
        param = {"ema": "alpha", "median": "window", "delta": "threshold"}[list(chain[0])[0]]
        errs.append("%s.%s: %s" % (p, param, e.split(": ", 1)[1]))
    extra = spec.get("chain", [])
    errs.extend(_check_chain(extra, p + ".chain"))
    return chain + (extra if isinstance(extra, list) else [])


def section_from_config(cfg):
    """The hub's section from a device config in the control plane's shape:
    {"sampling": {"interval_ms", "fields": [names], "sources"?: {name: source}}, "filters": {name: {...}}, "i2c"?}.
    Raises SensorError naming every problem by its path in that config."""
    s = cfg.get("sampling") or {}
    sources = s.get("sources") or {}
    errs = []
    fields = {}
    names = s.get("fields") or ["temperature", "humidity", "pressure", "cpu_temp"]
    for i, name in enumerate(names):
        src = sources.get(name) or DEFAULT_SOURCES.get(name)
        if src is None:
            errs.append("sampling.fields[%d]: no source for field %r (known: %s; or set sampling.sources.%s)"
                        % (i, name, ", ".join(sorted(DEFAULT_SOURCES)), name))
            continue
        if _split(src)[0] is None:
            errs.append("sampling.sources.%s: unknown source %r" % (name, src))
            continue
        fields[name] = {"source": src, "filters": _filter_chain(name, (cfg.get("filters") or {}).get(name), errs)}
    if errs:
        raise SensorError("; ".join(errs))
    return {"interval_ms": s.get("interval_ms", 1000), "i2c": cfg.get("i2c") or {}, "fields": fields}


class _Field:
    __slots__ = ("name", "driver", "quantity", "chain", "conf")

    def __init__(self, name, conf):
        self.name = name
        self.driver, self.quantity = _split(conf["source"])
        self.chain = _flt().build(conf["filters"]) if conf.get("filters") else None
        self.conf = conf


def _default_adc(ch):
    from iotlib import hal
    return hal.ADC(ch)


def _default_i2c(conf):
    from iotlib import hal
    bus = conf.get("bus", 0)
    if "sda" in conf and "scl" in conf:
        return hal.I2C(bus, scl=hal.Pin(conf["scl"]), sda=hal.Pin(conf["sda"]), freq=conf.get("freq", 400000))
    return hal.I2C(bus, freq=conf.get("freq", 400000))


def next_deadline(deadline, now, interval_ms):
    """The next sample time on a fixed grid, so late wake-ups under load do not add up (scheduling from each actual
    start lost ~13 % of a 20 Hz stream at load 15). More than one interval behind: a new grid from now, never a burst."""
    deadline = ticks_add(deadline, interval_ms)
    if ticks_diff(now, deadline) >= interval_ms:
        deadline = now
    return deadline


class SensorHub:
    #: Shortest sampling interval accepted (the control plane's schema allows 10 ms; at that rate a BME280 in normal
    #: mode repeats itself, and the loop must keep time for the web server, Wi-Fi and the watchdog).
    min_interval_ms = 10
    #: Most fields one device samples (each has a filter chain and a slot in every frame).
    max_fields = 16

    def __init__(self, adc_factory=None, i2c_factory=None, clock=None, on_fault=None, on_recover=None, log=None):
        """adc_factory(ch) / i2c_factory(i2c_conf): hardware constructors (default iotlib.hal). clock() → epoch ms for
        frame timestamps (TimeSyncManager.now_ms). on_fault(key, message) / on_recover(key): alarm hooks, called
        once per transition with key "sensor.<driver>"."""
        self._adc = adc_factory or _default_adc
        self._i2c_factory = i2c_factory or _default_i2c
        self._clock = clock or epoch_ms
        self._on_fault = on_fault
        self._on_recover = on_recover
        self._log = log
        self._fields = {}
        self._drivers = {}
        self._i2c = None
        self._i2c_conf = None
        self.interval_ms = 1000
        self.values = {}
        self.faults = {}
        self.seq = 0
        self.ts = 0
        self.samples = 0
        self._wake = asyncio.Event()
        self._listeners = []

    def configure(self, section):
        """Apply a "sensors" section (boot or hot reload). Raises SensorError naming every problem and then changes
        nothing. Filter state restarts only for fields whose config changed."""
        errs = validate(section)
        if errs:
            raise SensorError("; ".join(errs))
        i2c_conf = section.get("i2c", {})
        fields = {}
        for name, conf in section["fields"].items():
            old = self._fields.get(name)
            fields[name] = old if old is not None and old.conf == conf else _Field(name, conf)
        if i2c_conf != self._i2c_conf:
            self._i2c = None
            self._drivers = {}
            self._i2c_conf = i2c_conf
        used = set(f.driver for f in fields.values())
        for d in list(self._drivers):
            if d not in used:
                del self._drivers[d]
        for d in list(self.faults):
            if d not in used:
                self._recover(d)
        self._fields = fields
        self.values = {n: self.values.get(n) for n in fields}
        changed = section.get("interval_ms", 1000) != self.interval_ms
        self.interval_ms = section.get("interval_ms", 1000)
        if changed:
            self._wake.set()  # the sampling loop picks the new interval up now, not after the old one

    def field_names(self):
        return sorted(self._fields)

    def _driver(self, name):
        d = self._drivers.get(name)
        if d is None:
            if name == "rp2040":
                d = InternalTemp(self._adc)
            elif name.startswith("adc"):
                d = ADCChannel(self._adc, int(name[3]))
            else:
                if self._i2c is None:
                    self._i2c = self._i2c_factory(self._i2c_conf)
                if name == "bme280":
                    d = BME280(self._i2c, self._i2c_conf.get("bme280_address", 0x76))
                else:
                    d = SHT3x(self._i2c, self._i2c_conf.get("sht3x_address", 0x44))
            self._drivers[name] = d
        return d

    def _fault(self, drv, exc):
        msg = "%s read failed: %s" % (drv, exc)
        if drv not in self.faults:
            if self._log:
                self._log.warning("sensor failed", sensor=drv, error=str(exc))
            if self._on_fault:
                try:
                    self._on_fault("sensor." + drv, msg)
                except Exception:
                    pass
        self.faults[drv] = msg

    def _recover(self, drv):
        if self.faults.pop(drv, None) is not None:
            if self._log:
                self._log.info("sensor recovered", sensor=drv)
            if self._on_recover:
                try:
                    self._on_recover("sensor." + drv)
                except Exception:
                    pass

    async def sample(self):
        """Read every driver the fields use (each once), filter, publish. Returns the snapshot."""
        readings = {}
        for f in self._fields.values():
            if f.driver in readings:
                continue
            try:
                readings[f.driver] = await self._driver(f.driver).read()
                self._recover(f.driver)
            except Exception as e:  # noqa: BLE001 - any driver failure is a sensor fault, never a crash
                readings[f.driver] = None
                self._drivers.pop(f.driver, None)  # set up again on the next sample
                self._fault(f.driver, e)
        now = ticks_ms()
        for name, f in self._fields.items():
            r = readings[f.driver]
            v = None if r is None else r.get(f.quantity)
            if f.chain:
                flt = _flt()
                v = flt.run_chain(f.chain, v, now)
                if v is flt.SKIP:
                    continue
            self.values[name] = v
        self.seq += 1
        self.samples += 1
        self.ts = self._clock()
        snap = self.snapshot()
        for cb in self._listeners:
            try:
                cb(snap)
            except Exception as e:  # noqa: BLE001
                if self._log:
                    self._log.error("sample listener failed", error=str(e))
        return snap

    def snapshot(self):
        return {"seq": self.seq, "ts": self.ts, "values": dict(self.values)}

    def listen(self, cb):
        """cb(snapshot) after every sample (the WebSocket broadcaster)."""
        self._listeners.append(cb)

    async def run(self):
        deadline = ticks_ms()
        while True:
            await self.sample()
            self._wake.clear()
            deadline = next_deadline(deadline, ticks_ms(), self.interval_ms)
            left = ticks_diff(deadline, ticks_ms())
            if left > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), left / 1000)
                except asyncio.TimeoutError:
                    continue
                deadline = ticks_ms()  # woken by a config change: a new grid starts now
