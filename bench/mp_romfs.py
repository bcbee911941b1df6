# Run a bench module with the code executed in place from a ROMFS image, as on a board whose iotlib sits in a ROMFS
# partition (MicroPython >= 1.25) or is frozen into the firmware: bytecode and string constants stay in flash, only
# the objects the code creates (and the interned names) take heap. The unix port has no ROM partition, so the image
# is read into one bytearray at start: the heap this run needs minus the image size is what the board would need.
#     micropython -X heapsize=… -m mp_romfs IMAGE MODULE  → runs MODULE.main() with /rom first on sys.path
import sys
import os
import vfs

image, module = sys.argv[-2], sys.argv[-1]
buf = bytearray(os.stat(image)[6])
with open(image, "rb") as f:
    f.readinto(buf)
vfs.mount(vfs.VfsRom(buf), "/rom")
sys.path.insert(0, "/rom")
mod = __import__(module)
if not mod.__file__.startswith("/rom/"):
    raise SystemExit("%s was not loaded from the ROMFS image" % module)
if hasattr(mod, "main"):
    mod.main()
