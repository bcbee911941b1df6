import fwtest
from iotlib.compat import asyncio
from iotlib import sensors as S
from iotlib import filters as F

# BMP280/BME280 datasheet worked example (BMP280 datasheet §3.12): T = 25.08 °C, p = 100653.27 Pa.
CAL_T = (27504, 26435, -1000)
CAL_P = (36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
CAL_H = (75, 362, 0, 313, 50, 30)  # typical values read from a real BME280
ADC_T, ADC_P, ADC_H = 519888, 415148, 30000


def le16(v):
    v &= 0xFFFF
    return [v & 0xFF, v >> 8]


class FakeBME280:
    """A BME280 register map on an I2C bus: calibration, chip id, data registers; faults on demand."""

    def __init__(self, address=0x76, chip=0x60):
        self.address = address
        self.mem = bytearray(256)
        self.mem[0xD0] = chip
        cal = []
        for v in CAL_T + CAL_P:
            cal += le16(v)
        self.mem[0x88:0x88 + 24] = bytes(cal)
        h1, h2, h3, h4, h5, h6 = CAL_H
        self.mem[0xA1] = h1
        self.mem[0xE1:0xE3] = bytes(le16(h2))
        self.mem[0xE3] = h3
        self.mem[0xE4] = (h4 >> 4) & 0xFF
        self.mem[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        self.mem[0xE6] = (h5 >> 4) & 0xFF
        self.mem[0xE7] = h6 & 0xFF
        self.set_raw(ADC_T, ADC_P, ADC_H)
        self.fail = False
        self.writes = []

    def set_raw(self, t, p, h):
        self.mem[0xF7:0xFF] = bytes([p >> 12, (p >> 4) & 0xFF, (p & 0xF) << 4, t >> 12, (t >> 4) & 0xFF,
                                     (t & 0xF) << 4, h >> 8, h & 0xFF])

    def _check(self, addr):
        if self.fail:
            raise OSError(5)
        if addr != self.address:
            raise OSError(19)

    def readfrom_mem(self, addr, reg, n):
        self._check(addr)
        return bytes(self.mem[reg:reg + n])

    def writeto_mem(self, addr, reg, buf):
        self._check(addr)
        self.writes.append((reg, bytes(buf)))


class FakeSHT3x:
    def __init__(self, t_raw=0x6666, h_raw=0x8000):
        self.t_raw, self.h_raw = t_raw, h_raw
        self.corrupt = False

    def writeto(self, addr, buf):
        assert buf == b"\x24\x00"

    def readfrom(self, addr, n):
        t = bytes([self.t_raw >> 8, self.t_raw & 0xFF])
        h = bytes([self.h_raw >> 8, self.h_raw & 0xFF])
        crc_t = S.crc8(t) ^ (1 if self.corrupt else 0)
        return t + bytes([crc_t]) + h + bytes([S.crc8(h)])


class FakeADC:
    def __init__(self, values):
        self.values = values  # ch -> u16

    def factory(self, ch):
        adc = self

        class A:
            def read_u16(self):
                v = adc.values[ch]
                if v is None:
                    raise OSError(5)
                return v
        return A()


# --- independent oracle: the datasheet's integer compensation (BME280 datasheet §4.2.3) ---
def int_t_fine(adc_t):
    t1, t2, t3 = CAL_T
    v1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    v2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    return v1 + v2


def int_h(t_fine, adc_h):
    h1, h2, h3, h4, h5, h6 = CAL_H
    v = t_fine - 76800
    v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * \
        (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    v = max(0, min(v, 419430400))
    return (v >> 12) / 1024


def test_bme280_datasheet_example():
    bme = S.BME280(FakeBME280())
    r = fwtest.run(bme.read())
    assert abs(r["temperature"] - 25.08) < 0.01
    assert abs(r["pressure"] - 1006.53) < 0.01  # hPa
    t_fine = int_t_fine(ADC_T)
    assert abs(r["humidity"] - int_h(t_fine, ADC_H)) < 0.2
    assert 0 < r["humidity"] < 100


def test_bme280_humidity_matches_integer_formula_across_range():
    fake = FakeBME280()
    bme = S.BME280(fake)
    for adc_h in (20000, 25000, 32000, 40000):
        fake.set_raw(ADC_T, ADC_P, adc_h)
        r = fwtest.run(bme.read())
        assert abs(r["humidity"] - int_h(int_t_fine(ADC_T), adc_h)) < 0.2, (adc_h, r)


def test_bme280_setup_writes_mode_and_rejects_wrong_chip():
    fake = FakeBME280()
    fwtest.run(S.BME280(fake).read())
    assert (0xF4, b"\x27") in fake.writes and (0xF2, b"\x01") in fake.writes
    e = fwtest.raises(ValueError, fwtest.run, S.BME280(FakeBME280(chip=0x58)).read())
    assert "not a BME280" in str(e)


def test_sht3x_crc_and_conversion():
    assert S.crc8(b"\xbe\xef") == 0x92  # Sensirion datasheet example
    fake = FakeSHT3x()
    r = fwtest.run(S.SHT3x(fake).read())
    assert abs(r["temperature"] - (-45 + 175 * 0x6666 / 65535)) < 0.01
    assert abs(r["humidity"] - 50.0) < 0.01
    fake.corrupt = True
    e = fwtest.raises(ValueError, fwtest.run, S.SHT3x(fake).read())
    assert "CRC" in str(e)


def test_internal_temperature_formula():
    # 0.706 V -> 27 °C
    adc = FakeADC({4: int(0.706 / 3.3 * 65535)})
    r = fwtest.run(S.InternalTemp(adc.factory).read())
    assert abs(r["temperature"] - 27) < 0.1


# --- filters ---
def test_filters_validate_names_path():
    errs = F.validate([{"moving_average": 0}, {"clamp": {"min": 5, "max": 1}}, {"fft": 3},
                       {"calibrate": [[1, 2]]}, {"delta": -1}, "x"], "sensors.fields.t.filters")
    text = "\n".join(errs)
    assert "sensors.fields.t.filters[0].moving_average: window must be an integer 1-64" in text
    assert "[1].clamp: min is above max" in text
    assert "[2].fft: unknown filter" in text
    assert "[3].calibrate: needs" in text
    assert "[4].delta: must be a number >= 0" in text
    assert "[5]: must be an object" in text
    assert F.validate({"a": 1}) == ["filters: must be a list"]


def test_filter_chain_behaviour():
    ch = F.build([{"calibrate": [[0, 1], [10, 21]]}, {"clamp": {"max": 30}}, {"moving_average": 2}])
    assert F.run_chain(ch, 0, 0) == 1
    assert F.run_chain(ch, 10, 0) == 11  # (1 + 21) / 2
    assert F.run_chain(ch, 100, 0) == 25.5  # clamp 30, avg(21, 30)
    assert F.run_chain(ch, None, 0) is None  # a failed read passes through as None
    d = F.build([{"delta": 1.0}])
    assert [F.run_chain(d, v, 0) for v in (10, 10.5, 11.2, 11.0)] == [10, F.SKIP, 11.2, F.SKIP]
    t = F.build([{"throttle_ms": 100}])
    assert [F.run_chain(t, 1, now) for now in (0, 50, 100, 150, 250)] == [1, F.SKIP, 1, F.SKIP, 1]
    c = F.build([{"calibrate": {"scale": 2, "offset": -1}}])
    assert F.run_chain(c, 3, 0) == 5


# --- the hub ---
def make_hub(fake=None, adc=None, **kw):
    fake = fake or FakeBME280()
    adc = adc or FakeADC({0: 32768, 4: int(0.706 / 3.3 * 65535)})
    hub = S.SensorHub(adc_factory=adc.factory, i2c_factory=lambda conf: fake, clock=lambda: 1795000000000, **kw)
    return hub, fake, adc


CONF = {"interval_ms": 100, "fields": {"temperature": {"source": "bme280.temperature"},
                                       "pressure": {"source": "bme280.pressure"},
                                       "cpu_temp": {"source": "rp2040.temperature"},
                                       "a0": {"source": "adc0", "filters": [{"calibrate": {"scale": 2}}]}}}


def test_hub_sample_snapshot():
    hub, fake, adc = make_hub()
    hub.configure(CONF)
    snap = fwtest.run(hub.sample())
    assert snap["seq"] == 1 and snap["ts"] == 1795000000000
    v = snap["values"]
    assert abs(v["temperature"] - 25.08) < 0.01 and abs(v["pressure"] - 1006.53) < 0.01
    assert abs(v["cpu_temp"] - 27) < 0.1 and abs(v["a0"] - 3.3) < 0.01


def test_failing_sensor_publishes_none_and_alarms_once_then_recovers():
    events = []
    hub, fake, adc = make_hub(on_fault=lambda k, m: events.append(("fault", k, m)),
                              on_recover=lambda k: events.append(("ok", k)))
    hub.configure(CONF)
    fwtest.run(hub.sample())
    fake.fail = True
    adc.values[0] = None
    for _ in range(3):
        snap = fwtest.run(hub.sample())
    assert snap["values"]["temperature"] is None and snap["values"]["pressure"] is None
    assert snap["values"]["a0"] is None and abs(snap["values"]["cpu_temp"] - 27) < 0.1
    faults = [e for e in events if e[0] == "fault"]
    assert sorted(e[1] for e in faults) == ["sensor.adc0", "sensor.bme280"]  # once each, not per sample
    assert "bme280 read failed" in [e[2] for e in faults if e[1] == "sensor.bme280"][0]
    assert sorted(hub.faults) == ["adc0", "bme280"]
    fake.fail = False
    adc.values[0] = 100
    snap = fwtest.run(hub.sample())
    assert abs(snap["values"]["temperature"] - 25.08) < 0.01
    assert ("ok", "sensor.bme280") in events and hub.faults == {}


def test_missing_i2c_device_is_a_fault_not_a_crash():
    hub, fake, adc = make_hub(fake=FakeBME280(address=0x77))
    hub.configure(CONF)
    snap = fwtest.run(hub.sample())
    assert snap["values"]["temperature"] is None and "bme280" in hub.faults
    hub.configure(dict(CONF, i2c={"bme280_address": 0x77}))
    snap = fwtest.run(hub.sample())
    assert abs(snap["values"]["temperature"] - 25.08) < 0.01


def test_invalid_config_rejected_and_last_good_kept():
    hub, fake, adc = make_hub()
    hub.configure(CONF)
    bad = {"interval_ms": 5, "fields": {"x": {"source": "bme999.t"}, "y": {"source": "adc0", "filters": [{"delta": "a"}]}}}
    e = fwtest.raises(S.SensorError, hub.configure, bad)
    msg = str(e)
    assert "sensors.interval_ms: must be an integer 10-3600000" in msg
    assert "sensors.fields.x.source: unknown source" in msg
    assert "sensors.fields.y.filters[0].delta" in msg
    assert hub.interval_ms == 100 and hub.field_names() == ["a0", "cpu_temp", "pressure", "temperature"]
    assert S.validate({"fields": {}}) == ["sensors.fields: must be a non-empty object"]


def test_hot_reload_changes_fields_and_keeps_unchanged_filter_state():
    hub, fake, adc = make_hub()
    conf = {"interval_ms": 100, "fields": {"t": {"source": "bme280.temperature", "filters": [{"moving_average": 3}]},
                                           "a0": {"source": "adc0"}}}
    hub.configure(conf)
    fwtest.run(hub.sample())
    chain = hub._fields["t"].chain
    hub.configure({"interval_ms": 100, "fields": {"t": conf["fields"]["t"], "h": {"source": "bme280.humidity"}}})
    assert hub._fields["t"].chain is chain
    snap = fwtest.run(hub.sample())
    assert sorted(snap["values"]) == ["h", "t"]


def test_run_loop_applies_new_interval_without_restart():
    hub, fake, adc = make_hub()
    hub.configure(dict(CONF, interval_ms=3600000))

    async def go():
        task = asyncio.create_task(hub.run())
        await asyncio.sleep(0.05)
        assert hub.samples == 1  # the first sample, then a one-hour wait
        hub.configure(dict(CONF, interval_ms=50))
        for _ in range(100):
            if hub.samples >= 4:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        assert hub.samples >= 4
    fwtest.run(go())


def test_listener_failure_does_not_stop_sampling():
    hub, fake, adc = make_hub()
    hub.configure(CONF)
    got = []

    def bad(s):
        raise RuntimeError("x")
    hub.listen(bad)
    hub.listen(got.append)
    fwtest.run(hub.sample())
    assert len(got) == 1 and got[0]["seq"] == 1


def test_ema_and_median_filters():
    e = F.build([{"ema": 0.5}])
    assert [F.run_chain(e, v, 0) for v in (10, 20, 20)] == [10, 15, 17.5]
    m = F.build([{"median": 3}])
    assert [F.run_chain(m, v, 0) for v in (1, 100, 2, 3)] == [1, 50.5, 2, 3]  # the spike never wins
    assert "alpha" in F.validate([{"ema": 0}])[0]


def test_section_from_control_plane_config():
    cfg = {"sampling": {"interval_ms": 500, "fields": ["temperature", "cpu_temp", "light"],
                        "sources": {"light": "adc1"}},
           "filters": {"temperature": {"kind": "ema", "alpha": 0.3, "chain": [{"clamp": {"min": -40}}]},
                       "cpu_temp": {"kind": "none"}}}
    sec = S.section_from_config(cfg)
    assert sec["interval_ms"] == 500
    assert sec["fields"]["temperature"] == {"source": "bme280.temperature", "filters": [{"ema": 0.3},
                                                                                        {"clamp": {"min": -40}}]}
    assert sec["fields"]["light"]["source"] == "adc1" and sec["fields"]["cpu_temp"]["filters"] == []
    assert S.validate(sec) == []
    bad = {"sampling": {"fields": ["temperature", "wind"], "sources": {"temperature": "bme999.x"}},
           "filters": {"temperature": {"kind": "ema", "alpha": 7}, "wind": {"kind": "fft"}}}
    e = fwtest.raises(S.SensorError, S.section_from_config, bad)
    msg = str(e)
    assert "sampling.sources.temperature: unknown source 'bme999.x'" in msg
    assert "sampling.fields[1]: no source for field 'wind'" in msg
    bad2 = {"sampling": {"fields": ["temperature"]}, "filters": {"temperature": {"kind": "ema", "alpha": 7}}}
    assert "filters.temperature.alpha: alpha must be a number in (0, 1]" in str(
        fwtest.raises(S.SensorError, S.section_from_config, bad2))
    bad3 = {"sampling": {"fields": ["temperature"]}, "filters": {"temperature": {"kind": "fft"}}}
    assert "filters.temperature.kind: must be one of" in str(fwtest.raises(S.SensorError, S.section_from_config, bad3))
