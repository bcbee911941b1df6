"""Guards for the device's heap diet (docs/benchmarks.md, "Device memory"), run on the real MicroPython unix port
against the device bundle (.mpy): MicroPython interns every name of the loaded code into a pool that
grows by doubling, and the RelaysController's names fit in six pools — past them the seventh costs ≈ 14K on this 64-bit
port, ≈ 9K on a Pico."""
import re
import subprocess
from pathlib import Path

import pytest

from picoiot import build, paths
from picoiot.procs import micropython_available

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "build" / "host-heap"
pytestmark = pytest.mark.skipif(not micropython_available(), reason="needs the micropython unix port")

#: interned names after the RelaysController's code is loaded (main_sim.preload("relays")): 1,163 on 2026-12-03. The sixth
#: pool ends at 1,260 (past it a running device allocates the seventh: ≈ 14K on 64-bit, ≈ 9K on 32-bit), and a running
#: device interns ≈ 15-30 more (asyncio's submodules, names built at run time; otaboot only after an update).
RELAYS_QSTR_BUDGET = 1180
#: the same through the board's entry point, main.py, after it read the settings file (iotlib.settings' names stay
#: interned after the module is dropped). On a board many of these are the firmware's static names. 1,193 measured
#: (issue 11).
BOARD_QSTR_BUDGET = 1210


def _mp(script: str, heap: str = "512K") -> str:
    build.build_firmware(BUNDLE)
    proc = subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap}", "-c", script], capture_output=True,
                          text=True, timeout=60, env={"MICROPYPATH": f"{BUNDLE}:.frozen"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _qstrs(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"n_qstr=(\d+)", out)]


def test_relays_code_fits_six_qstr_pools_and_leaves_the_simulated_peripherals_unloaded():
    out = _mp("import sys, micropython\n"
              "import picosim as sim\n"
              "import main_sim\n"
              "main_sim.preload('relays')\n"
              "micropython.qstr_info()\n"
              "print('sim_io' if 'picosim.periph' in sys.modules else 'no sim_io')\n")
    n = _qstrs(out)[-1]
    assert "no sim_io" in out
    assert n <= RELAYS_QSTR_BUDGET, (f"the relays bundle interns {n} names (budget {RELAYS_QSTR_BUDGET}): past ≈ 1,260 "
                                     "MicroPython allocates a 7th qstr pool of ≈ 14K — cut names or raise the "
                                     "controllers' heap figures in docs/benchmarks.md")


def test_bundle_names_its_sources_by_module_so_loading_interns_no_file_name():
    # A .mpy carries a source name for tracebacks; as "metrics.py" it was one more interned name per module loaded
    # (27 on a sensors device). The module's dotted name is interned by the import anyway.
    build.build_firmware(BUNDLE)
    names = {p.relative_to(BUNDLE).as_posix(): build.embedded_source_name(p) for p in BUNDLE.rglob("*.mpy")}
    assert names["iotlib/metrics.mpy"] == "iotlib.metrics"
    assert names["iotlib/__init__.mpy"] == "iotlib" and names["main_sim.mpy"] == "main_sim"
    out = _mp("import micropython, sys\n"
              "from iotlib import log, fsutil\n"
              "micropython.qstr_info(1)\n"
              "try:\n"
              "    fsutil.write_atomic(None, 'x')\n"  # None + '.tmp': a TypeError raised inside iotlib.fsutil
              "except TypeError as e:\n"
              "    sys.print_exception(e)\n")
    assert "Q(log.py)" not in out and "Q(fsutil.py)" not in out and "Q(iotlib.log)" in out
    assert 'File "iotlib.fsutil", line' in out  # tracebacks name the module


def test_simulated_peripherals_load_on_first_use_of_adc_i2c_or_rtc():
    out = _mp("import sys\n"
              "import picosim as sim\nfrom iotlib import hal\n"
              "b = sim.configure(flash_root='/tmp/picoiot-host-heap')\n"
              "hal.Pin(2, hal.Pin.OUT).on()\n"
              "print('before', 'picosim.periph' in sys.modules)\n"
              "b.set_temperature(31.0)\n"
              "print('after', 'picosim.periph' in sys.modules, hal.ADC is sim.ADC, hal.ADC(4).read_u16() > 0)\n"
              "print('rtc', hal.RTC().datetime()[0], sorted(b.i2c[0]))\n")
    assert "before False" in out and "after True True True" in out and "rtc 2021 [68, 118]" in out


def test_masking_log_text_interns_no_characters():
    # Indexing a str makes a one-character string that MicroPython interns for good: a log scanner that did it kept
    # every character it ever saw in the qstr pool (≈ 35 names in a relays run, enough to cost the 7th pool).
    out = _mp("import micropython\n"
              "from iotlib import log\n"
              "log.mask_text('warm-up: x')\n"
              "micropython.qstr_info()\n"
              "t = 'QZJXVKWY qzjxvkwy 0123456789 ~^`|<>!?#$%@ token: abc password=hunter2 Bearer xyz'\n"
              "m = log.mask_text(t)\n"
              "micropython.qstr_info()\n"
              "print(m)\n")
    before, after = _qstrs(out)[-2:]
    assert after - before <= 2, f"mask_text interned {after - before} names"
    assert "token: *** password=*** Bearer ***" in out


def test_simulated_pin_log_is_small():
    # The simulated board logs every pin transition for tests (max_pin_events = 256); as 3-tuples a relays device
    # that switched a while carried ≈ 16K of them on this port. Packed: one small int each.
    out = _mp("import gc\n"
              "import picosim as sim\nfrom iotlib import hal\n"
              "b = sim.configure(flash_root='/tmp/picoiot-host-heap')\n"
              "p = hal.Pin(3, hal.Pin.OUT)\n"
              "gc.collect(); a = gc.mem_alloc()\n"
              "for _ in range(b.max_pin_events): p.toggle()\n"
              "gc.collect(); print('pinlog', gc.mem_alloc() - a, len(b.pin_events))\n")
    used, n = map(int, out.split("pinlog")[1].split())
    assert n == 256 and used < 4096, used


def test_the_boards_main_with_its_settings_stays_in_six_qstr_pools(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text('{"kind": "relays", "device_id": "d1", "device_key": "%s", "wifi": [{"ssid": "home", '
                        '"password": "pw-12345"}], "service_discovery_url": "http://127.0.0.1/api/devices"}' % ("k" * 64))
    out = _mp("import micropython\n"
              "import main\n"
              f"s, raw = main.load('{settings}')\n"
              "assert isinstance(s, dict), s\n"
              "main.preload(s['kind'])\n"
              "micropython.qstr_info()\n")
    n = _qstrs(out)[-1]
    assert n <= BOARD_QSTR_BUDGET, f"main.py + settings + the relays bundle intern {n} names (budget {BOARD_QSTR_BUDGET})"
