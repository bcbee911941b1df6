# Where a controller's code goes (bench/device_memory.py --breakdown): the simulated board is mounted from its own
# ROMFS image first (it stands in for a Pico W's built-in machine/network and is not counted), then every module the
# controller loads (main_sim.preload's list, in its order) is imported, printing `MOD <name> <mem_alloc>` after a full
# collection at each step, each followed by micropython.qstr_info()'s line (interned names: the pool grows by
# doubling, so its cost lands in steps).
#     micropython -X heapsize=512K -m mp_device_modules SIM_IMAGE KIND
import sys
import gc
import micropython


def snap(tag):
    gc.collect()
    gc.collect()
    print("MOD", tag, gc.mem_alloc())
    micropython.qstr_info()


def main(argv):
    image, kind = argv[-2], argv[-1]
    import boot_romfs
    boot_romfs.mount(image)
    import picosim
    picosim.configure(flash_root="/tmp/picoiot-device-modules")
    import main_sim
    from iotlib.compat import asyncio  # noqa: F401  (frozen in the port)
    snap("start")
    for m in main_sim._MODULES + main_sim._DOMAIN[kind]:
        __import__(m)
        snap(m)


main(sys.argv[1:])
