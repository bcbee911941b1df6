import os
import sys
import fwtest
import picosim as sim
from iotlib import hal, fsutil


def _board(**kw):
    kw.setdefault("clock", "manual")
    return sim.configure(flash_root=fwtest.tmpdir("flash"), **kw)


# ---------------------------------------------------------------- hal selection
def test_hal_is_simulated_without_a_board():
    _board()
    assert hal.SIMULATED
    assert hal.Pin is sim.Pin and hal.WDT is sim.WDT and hal.I2C is sim.I2C
    assert hal.WLAN(hal.STA_IF) is sim.board.wlan


class _Fake:
    pass


def _fake_board_modules(cause_code):
    m = _Fake()
    m.calls = []
    for name in ("Pin", "ADC", "I2C", "RTC"):
        setattr(m, name, name)
    m.WDT = "WDT"
    m.PWRON_RESET, m.WDT_RESET, m.HARD_RESET = 1, 3, 2
    m.reset_cause = lambda: cause_code
    m.unique_id = lambda: b"\xe6\x61\x41\x04\x03\x5b\x2a\x2d"
    m.reset = lambda: m.calls.append("reset")
    m.soft_reset = lambda: m.calls.append("soft_reset")
    n = _Fake()
    n.WLAN = "WLAN"
    n.STA_IF, n.AP_IF = 0, 1
    return m, n


def _import_board_hal(cause_code):
    """iotlib.hal imported afresh with fake `machine`/`network` modules that have what a Pico W has."""
    m, n = _fake_board_modules(cause_code)
    saved = {k: sys.modules.get(k) for k in ("machine", "network", "iotlib.hal")}
    sys.modules["machine"] = m
    sys.modules["network"] = n
    del sys.modules["iotlib.hal"]
    try:
        board_hal = __import__("iotlib.hal", None, None, ["hal"])
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        import iotlib
        iotlib.hal = saved["iotlib.hal"]
    return board_hal, m


def test_hal_uses_real_modules_when_they_have_what_a_pico_has():
    board_hal, m = _import_board_hal(3)
    assert not board_hal.SIMULATED
    assert board_hal.Pin == "Pin" and board_hal.WLAN == "WLAN" and board_hal.WDT == "WDT"
    assert board_hal.unique_id() == b"\xe6\x61\x41\x04\x03\x5b\x2a\x2d"
    assert board_hal.flash_path("state.json") == "/state.json"
    assert hal.SIMULATED and hal.Pin is sim.Pin  # the simulated hal is untouched


def test_board_reset_cause_maps_the_hardware_register():
    for code, cause in ((1, "power_on"), (3, "watchdog"), (2, "hard"), (9, "unknown")):
        board_hal, _ = _import_board_hal(code)
        board_hal.flash_root = lambda: fwtest.tmpdir("root")
        assert board_hal.reset_cause() == cause


def test_board_reset_leaves_its_cause_for_the_next_boot():
    root = fwtest.tmpdir("root")
    board_hal, m = _import_board_hal(3)  # rp2 resets through the watchdog: the register alone would say "watchdog"
    board_hal.flash_root = lambda: root
    board_hal.reset()
    assert m.calls == ["reset"]
    board_hal, _ = _import_board_hal(3)  # the next boot: hal imported afresh
    board_hal.flash_root = lambda: root
    assert board_hal.reset_cause() == "hard"
    board_hal, _ = _import_board_hal(3)
    board_hal.flash_root = lambda: root
    assert board_hal.reset_cause() == "watchdog"  # the marker was consumed by the boot that read it


# ---------------------------------------------------------------- pins
def test_pin_transitions_are_logged_with_board_time():
    b = _board()
    p = hal.Pin(2, hal.Pin.OUT, value=0)
    b.advance(10)
    p.on()
    b.advance(5)
    p.on()  # no change, no event
    p.off()
    p.toggle()
    assert b.events_of(2) == [(0, 2, 0), (10, 2, 1), (15, 2, 0), (15, 2, 1)]
    assert p.value() == 1 and b.pin_value(2) == 1


def test_first_overlap_sees_a_zero_length_overlap():
    b = _board()
    r1 = hal.Pin(2, hal.Pin.OUT, value=0)
    r2 = hal.Pin(3, hal.Pin.OUT, value=0)
    r1.on()
    r1.off()
    r2.on()  # interlocked: r1 off before r2 on
    assert b.first_overlap((2, 3)) is None
    r1.on()
    r2.off()  # on together for no time at all: still an overlap
    assert b.first_overlap((2, 3)) == (0, 2, 1)
    assert b.first_overlap((2, 3), level=0) == (0, 3, 0)  # both start off


def test_pin_log_is_bounded():
    b = _board()
    b.max_pin_events = 8
    p = hal.Pin(5, hal.Pin.OUT)
    for _ in range(20):
        p.toggle()
    assert len(b.pin_events) == 8
    assert b.pin_events_dropped == 13


def test_pin_log_keeps_time_pin_and_level_of_any_pin_id():
    b = sim.configure(flash_root=fwtest.tmpdir("pinlog"), clock="manual")
    p = hal.Pin(29, hal.Pin.OUT)   # packed into one int per event
    q = hal.Pin("LED", hal.Pin.OUT)  # a named pin (rp2 has "LED"): kept as a tuple
    b.advance(123456)
    p.on()
    q.on()
    b.advance(1)
    p.off()
    assert b.pin_events == [(0, 29, 0), (0, "LED", 0), (123456, 29, 1), (123456, "LED", 1), (123457, 29, 0)]
    assert b.events_of(29)[-1] == (123457, 29, 0) and b.first_overlap((29, "LED")) == (123456, "LED", 1)


def test_driven_input_runs_irq_handler():
    b = _board()
    seen = []
    button = hal.Pin(14, hal.Pin.IN, hal.Pin.PULL_UP)
    assert button.value() == 1
    button.irq(lambda pin: seen.append(pin.value()), hal.Pin.IRQ_FALLING)
    b.drive(14, 0)
    b.drive(14, 1)  # rising edge: not asked for
    b.drive(14, 0)
    assert seen == [0, 0]


# ---------------------------------------------------------------- ADC
def _temp_c(u16):
    # the conversion MicroPython's docs give for the RP2040 sensor
    return 27 - (u16 * 3.3 / 65535 - 0.706) / 0.001721


def test_adc4_internal_temperature_uses_rp2040_conversion():
    b = _board()
    adc = hal.ADC(4)
    for c in (-10.0, 0.0, 27.0, 42.5):
        b.set_temperature(c)
        assert abs(_temp_c(adc.read_u16()) - c) < 0.5  # one 12-bit step is 0.47 °C
    b.set_temperature(27.0)
    raw = adc.read_u16()
    assert raw & 0xF == raw >> 12  # a 12-bit reading scaled to 16 bits the way rp2 does it


def test_adc_scripted_sequence_callable_and_fault():
    b = _board()
    b.set_adc(0, [100, 200, OSError(5), 300])
    adc = hal.ADC(26)  # GPIO26 is ADC0
    assert adc.read_u16() == 100 and adc.read_u16() == 200
    fwtest.raises(OSError, adc.read_u16)
    assert adc.read_u16() == 300 and adc.read_u16() == 300  # the last one sticks
    b.set_adc(1, lambda now: now)
    b.advance(1234)
    assert hal.ADC(1).read_u16() == 1234
    b.set_adc_volts(2, 1.65)
    assert abs(hal.ADC(2).read_u16() - 32768) < 20
    fwtest.raises(ValueError, hal.ADC, 7)


# ---------------------------------------------------------------- I2C: BME280 through a datasheet driver
def _s16(lo, hi):
    v = lo | (hi << 8)
    return v - 65536 if v > 32767 else v


def _bme280_read(i2c, addr=0x76, forced=True, osrs_h=1):
    """An independent BME280 reader using the datasheet's floating-point compensation."""
    assert i2c.readfrom_mem(addr, 0xD0, 1) == b"\x60"
    c = i2c.readfrom_mem(addr, 0x88, 24)
    t1 = c[0] | (c[1] << 8)
    t2, t3 = _s16(c[2], c[3]), _s16(c[4], c[5])
    p1 = c[6] | (c[7] << 8)
    p = [_s16(c[i], c[i + 1]) for i in range(8, 24, 2)]
    h1 = i2c.readfrom_mem(addr, 0xA1, 1)[0]
    e = i2c.readfrom_mem(addr, 0xE1, 7)
    h2, h3 = _s16(e[0], e[1]), e[2]
    h4 = (e[3] << 4) | (e[4] & 0xF)
    h5 = (e[5] << 4) | (e[4] >> 4)
    h6 = e[6] - 256 if e[6] > 127 else e[6]
    i2c.writeto_mem(addr, 0xF2, bytes([osrs_h]))
    i2c.writeto_mem(addr, 0xF4, bytes([(1 << 5) | (1 << 2) | (1 if forced else 3)]))
    while i2c.readfrom_mem(addr, 0xF3, 1)[0] & 0x08:
        pass
    d = i2c.readfrom_mem(addr, 0xF7, 8)
    adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
    adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
    adc_h = (d[6] << 8) | d[7]
    v1 = (adc_t / 16384.0 - t1 / 1024.0) * t2
    v2 = (adc_t / 131072.0 - t1 / 8192.0) ** 2 * t3
    t_fine = v1 + v2
    temp = t_fine / 5120.0
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * p[4] / 32768.0 + v1 * p[3] * 2.0
    v2 = v2 / 4.0 + p[2] * 65536.0
    v1 = (p[1] * v1 * v1 / 524288.0 + p[0] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * p1
    pr = 1048576.0 - adc_p
    pr = (pr - v2 / 4096.0) * 6250.0 / v1
    pr = pr + (p[7] * pr * pr / 2147483648.0 + pr * p[6] / 32768.0 + p[5]) / 16.0
    h = t_fine - 76800.0
    h = (adc_h - (h4 * 64.0 + h5 / 16384.0 * h)) * (h2 / 65536.0 * (1.0 + h6 / 67108864.0 * h *
                                                                       (1.0 + h3 / 67108864.0 * h)))
    h = h * (1.0 - h1 * h / 524288.0)
    h = 0.0 if h < 0 else 100.0 if h > 100 else h
    return temp, pr, h, adc_h


def test_bme280_reads_scripted_values_through_datasheet_formulas():
    b = _board()
    i2c = hal.I2C(0, scl=hal.Pin(5), sda=hal.Pin(4))
    assert i2c.scan() == [0x44, 0x76]
    bme = b.i2c[0][0x76]
    for t, pa, rh in ((21.5, 101325.0, 40.0), (-12.25, 87000.0, 5.0), (38.0, 104500.0, 93.5)):
        bme.set(temperature=t, pressure=pa, humidity=rh)
        temp, pr, h, _ = _bme280_read(i2c)
        assert abs(temp - t) < 0.02, temp
        assert abs(pr - pa) < 3.0, pr
        assert abs(h - rh) < 0.1, h


def test_bme280_normal_mode_samples_every_read_and_disabled_humidity_reads_skipped():
    b = _board()
    i2c = hal.I2C(0)
    bme = b.i2c[0][0x76]
    bme.set(temperature=[20.0, 25.0, 30.0])
    assert abs(_bme280_read(i2c, forced=False)[0] - 20.0) < 0.02
    d1 = i2c.readfrom_mem(0x76, 0xF7, 8)
    d2 = i2c.readfrom_mem(0x76, 0xF7, 8)
    assert d1 != d2 and bme.measurements == 3
    _, _, _, adc_h = _bme280_read(i2c, osrs_h=0)
    assert adc_h == 0x8000  # humidity oversampling 0: the chip's "skipped" value


def test_bme280_soft_reset_restores_power_on_registers():
    _board()
    i2c = hal.I2C(0)
    _bme280_read(i2c)
    i2c.writeto_mem(0x76, 0xE0, b"\xb6")
    assert i2c.readfrom_mem(0x76, 0xF4, 1) == b"\x00"
    assert i2c.readfrom_mem(0x76, 0xFA, 3) == b"\x80\x00\x00"


def test_i2c_faults_nack_and_unplugged_sensor():
    b = _board()
    i2c = hal.I2C(0)
    e = fwtest.raises(OSError, i2c.readfrom_mem, 0x50, 0, 1)  # nobody at 0x50
    assert e.args[0] == 5
    bme = b.i2c[0][0x76]
    bme.fail(count=2)
    fwtest.raises(OSError, _bme280_read, i2c)
    fwtest.raises(OSError, _bme280_read, i2c)
    assert abs(_bme280_read(i2c)[0] - 21.5) < 0.02  # transient fault over
    bme.fail(OSError(110))
    assert fwtest.raises(OSError, i2c.readfrom_mem, 0x76, 0xD0, 1).args[0] == 110
    bme.present = False
    assert i2c.scan() == [0x44]
    fwtest.raises(OSError, i2c.readfrom_mem, 0x76, 0xD0, 1)
    bme.present = True
    bme.set(temperature=[OSError(5), 23.0])
    fwtest.raises(OSError, _bme280_read, i2c)
    assert abs(_bme280_read(i2c)[0] - 23.0) < 0.02
    fwtest.raises(ValueError, hal.I2C, 2)


# ---------------------------------------------------------------- I2C: SHT3x
def _crc8(data):
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _sht_read(i2c, cmd=b"\x24\x00"):
    if cmd:
        i2c.writeto(0x44, cmd)
    d = i2c.readfrom(0x44, 6)
    if _crc8(d[0:2]) != d[2] or _crc8(d[3:5]) != d[5]:
        raise ValueError("crc")
    return -45 + 175 * ((d[0] << 8) | d[1]) / 65535, 100 * ((d[3] << 8) | d[4]) / 65535


def test_crc8_matches_sensirion_example():
    from picosim import i2c as sim_i2c
    assert _crc8(b"\xbe\xef") == 0x92 == sim_i2c._crc8(b"\xbe\xef")


def test_sht3x_single_shot_periodic_status_and_faults():
    b = _board()
    i2c = hal.I2C(0)
    sht = b.i2c[0][0x44]
    sht.set(temperature=23.4, humidity=56.7)
    t, h = _sht_read(i2c)
    assert abs(t - 23.4) < 0.01 and abs(h - 56.7) < 0.01
    fwtest.raises(OSError, i2c.readfrom, 0x44, 6)  # no measurement pending: NACK
    i2c.writeto(0x44, b"\x21\x30")  # periodic 1 mps
    sht.set(temperature=[10.0, 11.0])
    assert abs(_sht_read(i2c, b"\xe0\x00")[0] - 10.0) < 0.01
    assert abs(_sht_read(i2c, b"\xe0\x00")[0] - 11.0) < 0.01
    i2c.writeto(0x44, b"\x30\x93")  # break
    i2c.writeto(0x44, b"\xe0\x00")
    fwtest.raises(OSError, i2c.readfrom, 0x44, 6)
    i2c.writeto(0x44, b"\x30\x6d")  # heater on
    i2c.writeto(0x44, b"\xf3\x2d")
    st = i2c.readfrom(0x44, 3)
    assert st[0] & 0x20 and _crc8(st[:2]) == st[2]
    fwtest.raises(OSError, i2c.writeto, 0x44, b"\x12\x34")  # unknown command
    sht.corrupt_crc = True
    fwtest.raises(ValueError, _sht_read, i2c)
    assert sht.commands[0] == 0x2400


# ---------------------------------------------------------------- WLAN
def test_wlan_scripted_statuses_cover_every_cyw43_code():
    b = _board()
    w = hal.WLAN(hal.STA_IF)
    assert w.status() == hal.STAT_IDLE and not w.active()
    fwtest.raises(OSError, w.connect, "lab", "pw")  # inactive interface
    w.active(True)
    b.wlan.script([1, -1], [1, -2], [1, -3], [1, 1, 2, 3])
    seen = []
    for _ in range(4):
        w.connect("lab", "pw")
        for _ in range(5):
            seen.append(w.status())
    assert seen == [1, -1, -1, -1, -1, 1, -2, -2, -2, -2, 1, -3, -3, -3, -3, 1, 1, 2, 3, 3]
    assert w.isconnected() and w.ifconfig()[0] == "192.168.4.23"
    assert b.wlan.connects == ["lab"] * 4
    w.disconnect()
    seen.append(w.status())
    assert sorted(set(seen)) == sorted([hal.STAT_IDLE, hal.STAT_CONNECTING, hal.STAT_NO_IP, hal.STAT_GOT_IP,
                                        hal.STAT_CONNECT_FAIL, hal.STAT_NO_AP_FOUND, hal.STAT_WRONG_PASSWORD])


def test_wlan_access_point_checks_ssid_and_password():
    b = _board()
    b.wlan.ap = ("lab", "secret")
    w = hal.WLAN()
    w.active(True)
    w.connect("other", "secret")
    assert [w.status(), w.status()] == [1, hal.STAT_NO_AP_FOUND]
    w.connect("lab", "wrong")
    assert [w.status(), w.status()] == [1, hal.STAT_WRONG_PASSWORD]
    w.connect("lab", "secret")
    while w.status() not in (3, -1, -2, -3):
        pass
    assert w.isconnected()


def test_wlan_config_pm_recorded_and_rssi_scripted():
    b = _board()
    w = hal.WLAN()
    assert w.config("pm") == w.PM_PERFORMANCE
    w.config(pm=0xA11140)
    assert b.wlan.config_log == [("pm", 0xA11140)] and w.config("pm") == 0xA11140
    fwtest.raises(ValueError, w.config, "nope")
    fwtest.raises(ValueError, w.config, nope=1)
    b.wlan.rssi = [-50, -70, -90]
    assert [w.status("rssi") for _ in range(4)] == [-50, -70, -90, -90]


def test_wlan_silent_link_death_and_visible_drop():
    b = _board()
    w = hal.WLAN()
    w.active(True)
    w.connect("lab", "pw")
    while w.status() != 3:
        pass
    hal.link_check()
    b.wlan.kill_link()
    assert w.isconnected() and w.status() == 3  # looks fine...
    e = fwtest.raises(OSError, hal.link_check)  # ...but nothing gets through
    assert e.args[0] == 110
    w.disconnect()
    w.connect("lab", "pw")
    while w.status() != 3:
        pass
    hal.link_check()  # a reconnect heals it
    b.wlan.drop()
    assert not w.isconnected() and w.status() == -1
    fwtest.raises(OSError, hal.link_check)


# ---------------------------------------------------------------- WDT, reset, flash, RTC
def test_wdt_rejects_timeouts_above_rp2040_maximum():
    _board()
    fwtest.raises(ValueError, hal.WDT, timeout=8389)
    fwtest.raises(ValueError, hal.WDT, timeout=0)
    hal.WDT(timeout=hal.WDT_MAX_MS)


def test_wdt_fed_in_time_never_fires():
    b = _board()
    wdt = hal.WDT(timeout=8000)
    for _ in range(100):
        b.advance(7999)
        wdt.feed()
    assert b.wdt_feeds == 100 and b.reset_count == 0


def test_starved_wdt_resets_and_next_boot_reports_watchdog():
    b = _board()
    fsutil.write_json_atomic(hal.flash_path("keep.json"), {"relay1": 1})
    hal.Pin(2, hal.Pin.OUT, value=1)
    wdt = hal.WDT(timeout=2000)
    b.advance(2000)  # exactly at the limit: still alive
    wdt.check()
    e = fwtest.raises(sim.SimulatedReset, b.advance, 1)
    assert e.cause == "watchdog" and isinstance(e, SystemExit)
    b.advance(10000)  # the dead chip doesn't reset twice before it boots
    b.boot()
    assert hal.reset_cause() == "watchdog" and hal.reset_cause() == "watchdog"
    assert b.reset_count == 1 and b.pin_value(2) is None and b.wdt_timeout is None
    assert fsutil.read_json(hal.flash_path("keep.json")) == {"relay1": 1}  # flash survives
    b.boot()  # a boot after a power cycle
    assert hal.reset_cause() == "power_on"


def test_late_feed_is_too_late_and_explicit_check_with_time():
    b = _board()
    wdt = hal.WDT(timeout=1000)
    b.manual_clock = True
    b._now = b.now_ms() + 1001  # time passed without advance() noticing
    fwtest.raises(sim.SimulatedReset, wdt.feed)
    b.boot()
    wdt = hal.WDT(timeout=1000)
    wdt.check(b.now_ms() + 1000)
    fwtest.raises(sim.SimulatedReset, wdt.check, b.now_ms() + 1001)


def test_reset_and_soft_reset_record_their_cause():
    b = _board()
    assert hal.reset_cause() == "power_on"
    assert fwtest.raises(sim.SimulatedReset, hal.reset).cause == "hard"
    b.boot()
    assert hal.reset_cause() == "hard"
    assert fwtest.raises(hal.SimulatedReset, hal.soft_reset).cause == "soft"
    sim.boot()
    assert hal.reset_cause() == "soft"


def test_flash_root_from_configure_and_environment():
    d = fwtest.tmpdir("envflash")
    b = sim.configure(flash_root=d + "/a/b")
    assert hal.flash_root() == d + "/a/b" and fsutil.is_dir(d + "/a/b")
    assert hal.flash_path("x.json") == d + "/a/b/x.json"
    if hasattr(os, "environ"):  # CPython: putenv would not reach os.getenv
        os.environ["PICOIOT_FLASH"] = d + "/env"
    else:
        os.putenv("PICOIOT_FLASH", d + "/env")
    try:
        assert sim.configure().flash_root == d + "/env"
    finally:
        if hasattr(os, "environ"):
            del os.environ["PICOIOT_FLASH"]
        else:
            os.unsetenv("PICOIOT_FLASH")
    assert b.unique_id() == sim.configure(flash_root=d + "/a/b").unique_id()
    assert len(hal.unique_id()) == 8 and hal.unique_id() != sim.configure(flash_root=d).unique_id()


def test_rtc_boots_at_2021_then_follows_the_board_clock():
    b = _board()
    rtc = hal.RTC()
    assert rtc.datetime() == (2021, 1, 1, 4, 0, 0, 0, 0)
    rtc.datetime((2026, 11, 26, 3, 23, 59, 58, 0))
    b.advance(3000)
    assert rtc.datetime() == (2026, 11, 27, 4, 0, 0, 1, 0)
    rtc.datetime((2024, 2, 29, 3, 12, 0, 0, 0))
    assert rtc.datetime()[:3] == (2024, 2, 29)


def test_iotlib_sensor_drivers_read_the_simulated_sensors():
    from iotlib import sensors
    b = _board()
    i2c = hal.I2C(0)
    b.i2c[0][0x76].set(temperature=19.75, pressure=99870.0, humidity=61.0)
    b.i2c[0][0x44].set(temperature=-3.5, humidity=88.0)
    b.set_temperature(31.0)
    bme = fwtest.run(sensors.BME280(i2c).read())
    sht = fwtest.run(sensors.SHT3x(i2c).read())
    cpu = fwtest.run(sensors.InternalTemp(hal.ADC).read())
    assert abs(bme["temperature"] - 19.75) < 0.02 and abs(bme["pressure"] - 998.70) < 0.03
    assert abs(bme["humidity"] - 61.0) < 0.1
    assert abs(sht["temperature"] + 3.5) < 0.01 and abs(sht["humidity"] - 88.0) < 0.01
    assert abs(cpu["temperature"] - 31.0) < 0.5


def test_virtual_time_wakes_sleepers_in_order_and_fires_the_wdt():
    from iotlib.compat import asyncio
    b = _board()
    woke = []

    async def sleeper(name, ms):
        await b.vsleep(ms)
        woke.append((name, b.now_ms()))

    async def main():
        asyncio.create_task(sleeper("late", 90000))
        asyncio.create_task(sleeper("early", 1500))
        asyncio.create_task(sleeper("mid", 30000))
        await b.run_for(60000)
        assert b.now_ms() == 60000
        await b.run_for(30000)

    fwtest.run(main())
    assert woke == [("early", 1500), ("mid", 30000), ("late", 90000)]

    async def starve():
        hal.WDT(timeout=8000)
        await b.run_for(60000)

    fwtest.raises(sim.SimulatedReset, fwtest.run, starve())
    assert b.now_ms() == 90000 + 8001  # the clock stops where the WDT fired, not at the end of the jump


def test_uncaught_reset_ends_the_process_with_status_75():
    e = sim.SimulatedReset("watchdog")
    assert e.args == (75,) and e.cause == "watchdog" and sim.RESET_EXIT_CODE == 75


def test_simulated_board_supplies_sha1_where_the_port_lacks_it():
    # A unix build without TLS has no hashlib.sha1; the WebSocket handshake needs it (a Pico W has it built in).
    import binascii
    for msg, want in ((b"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"),
                      (b"a" * 100, "7f9000257a4918d7072655ea468540cdcbd42e0c")):
        assert binascii.hexlify(hal.sha1(msg).digest()).decode() == want
