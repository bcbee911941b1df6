# MicroPython entry point: `micropython -X heapsize=192K -m it_main <scenario>` runs it_<scenario>.main(ctl), talking to
# the orchestrator over stdin/stdout (see it_device.Ctl). Last line: "@@DONE <json result>" or a traceback + exit 1.
import gc
import json
import sys

from iotlib import log
from iotlib.compat import asyncio
from it_device import Ctl


def main():
    name = sys.argv[1]
    log.configure(level="info", console=True)  # the device's log is part of the test's failure output
    mod = __import__("it_" + name)
    try:
        ctl = Ctl()
        result = asyncio.run(mod.main(ctl))
    except Exception as e:
        sys.print_exception(e)
        sys.exit(1)
    gc.collect()
    out = {"result": result, "mem_free": gc.mem_free(), "min_free": ctl.min_free}
    sys.stdout.write("@@DONE " + json.dumps(out) + "\n")


main()
