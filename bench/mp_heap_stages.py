# Where a controller's heap goes (bench/device_memory.py --trace): runs main_sim like main_sim.run does, printing
# `STAGE <name> <mem_alloc> <mem_free>` after a full collection at each stage (all code loaded, controller
# constructed, local API listening) and then every 2 s in steady state, each followed by micropython.qstr_info()'s
# line. In ROMFS mode (a .img argument) the image is mounted first and its buffer is subtracted from mem_alloc.
import sys
import gc
import micropython

_IMG = 0
QSTRS = bool(__import__("os").getenv("PICOIOT_QSTRS"))
MEMINFO = bool(__import__("os").getenv("PICOIOT_MEMINFO"))


def snap(tag, names=False):
    gc.collect()
    gc.collect()
    print("STAGE", tag, gc.mem_alloc() - _IMG, gc.mem_free())
    if names:  # PICOIOT_QSTRS=1: also every interned name (at preload and t10); any argument makes it list them
        micropython.qstr_info(1)
    else:
        micropython.qstr_info()


def main(argv):
    global _IMG
    if [a for a in argv if a.endswith(".img")] or __import__("os").getenv("PICOIOT_ROMFS"):
        import boot_romfs
        _IMG = len(boot_romfs.mount(boot_romfs._image(argv)))
    argv = [a for a in argv if not a.endswith(".img")]
    snap("start")
    import main_sim
    import picosim as sim
    from iotlib.fsutil import makedirs
    from iotlib.compat import asyncio
    s = main_sim.settings(argv)
    makedirs(s["flash_dir"])
    sim.configure(flash_root=s["flash_dir"])
    snap("sim")

    async def run():
        main_sim.preload(s["kind"])
        snap("preload", QSTRS)
        ctl = main_sim.make(s)
        snap("make")
        await ctl.start()
        snap("start")
        if MEMINFO:
            micropython.mem_info(1)
        print("picoiot device %s listening on http://127.0.0.1:%d" % (s["device_id"], s["port"]))
        n = 0
        while True:
            await asyncio.sleep(2)
            n += 1
            snap("t%d" % (2 * n), QSTRS and n == 5)
            if n == 5 and MEMINFO:  # PICOIOT_MEMINFO=1: the heap's block map once in steady state
                micropython.mem_info(1)

    asyncio.run(run())


main(sys.argv[1:])
