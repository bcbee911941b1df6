# Run a simulated device with its code executed in place from a ROMFS image, as on a Pico W whose iotlib, controllers
# and microdot sit in the ROM partition (MicroPython >= 1.25, `mpremote romfs deploy`): bytecode and constants stay in
# flash, only the objects the code creates (and interned names) take heap.
#   MICROPYPATH=build/firmware:.frozen micropython -X heapsize=<192K + image> -m boot_romfs [romfs.img] settings.json
# The image (from `picoiot firmware build --romfs`; default: romfs.img beside this module) is read into ONE bytearray
# allocated before anything else, so it is contiguous and at one end of the heap; run with a heap of 192K plus the
# image size and the program's own objects get exactly a Pico's 192K. The rest of argv goes to main_sim.
# On a board this module is not needed: /rom is mounted and first on sys.path at boot; main.py calls the controller.
import sys
import os

try:
    import vfs
except ImportError:  # CPython: no ROMFS; run from sources
    vfs = None


def _image(argv):
    for a in argv:
        if a.endswith(".img"):
            return a
    env = os.getenv("PICOIOT_ROMFS")
    if env:
        return env
    f = __file__
    i = f.rfind("/")
    return (f[:i + 1] if i >= 0 else "") + "romfs.img"


def mount(path, where="/rom"):
    buf = bytearray(os.stat(path)[6])
    with open(path, "rb") as f:
        if f.readinto(buf) != len(buf):
            raise SystemExit("boot_romfs: short read of " + path)
    vfs.mount(vfs.VfsRom(buf), where)
    sys.path.insert(0, where)
    return buf


def main(argv):
    if vfs is not None:
        mount(_image(argv))
    import main_sim
    if vfs is not None and not main_sim.__file__.startswith("/rom/"):
        raise SystemExit("boot_romfs: main_sim was not loaded from the ROMFS image")
    main_sim.main([a for a in argv if not a.endswith(".img")])


if __name__ == "__main__":
    main(sys.argv[1:])
