# Where the heap goes when iotlib is imported (runs under the unix micropython, code as .mpy): for each module, in
# dependency order, the heap it adds (gc.collect(); gc.mem_free() before/after) and the interned-name (qstr) pool
# figures after it, printed as `MOD <name> <mem_free>` followed by micropython.qstr_info()'s line. The qstr pool
# grows by doubling, so its cost lands in steps on whichever module needs the next pool; bench/firmware_memory.py
# parses this output and shows code/objects and qstrs apart. The last row is the benchmark script itself (peers and
# workload code, not iotlib).
import gc
import os
import micropython

MODULES = ("compat", "fsutil", "log", "metrics", "config", "alarms", "http", "auth", "hal", "net", "watchdog",
           "state", "timesync")

if os.getenv("PICOIOT_SIM_IMG"):  # the simulated board (which hal loads) in place from its own image: not counted
    import boot_romfs
    boot_romfs.mount(os.getenv("PICOIOT_SIM_IMG"))
import picosim  # noqa: E402  (before the first snapshot: its names and objects are the simulator's, not iotlib's)

picosim.configure(flash_root="/tmp/picoiot-import-cost")


def snap(tag):
    gc.collect()
    gc.collect()
    print("MOD", tag, gc.mem_free())
    micropython.qstr_info()


import asyncio  # noqa: E402,F401  (frozen in the port; microdot's baseline pays it too)

snap("start")
import iotlib  # noqa: E402,F401

snap("iotlib")
for _m in MODULES:
    __import__("iotlib." + _m)
    snap(_m)
import mp_iotlib_all  # noqa: E402,F401  (its workload runs only as __main__)

snap("bench_script")
