# main_sim with the simulated board's pin transition log written out, for the end-to-end interlock test (tests-only).
# Every 100 ms, when the log changed, <flash>/pinlog.json gets {"events": [[ms, pin, level], ...], "dropped": n}
# (temp + rename, so a reader never sees half a file). Runs under the unix micropython (.mpy) and CPython.
import os
import sys
import json
import main_sim
import picosim as sim
from iotlib.compat import asyncio


async def _dump(path):
    seen = -1
    while True:
        b = sim.board
        n = len(b.pin_events) + b.pin_events_dropped
        if n != seen:
            seen = n
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps({"events": [list(e) for e in b.pin_events], "dropped": b.pin_events_dropped}))
            os.rename(path + ".tmp", path)
        await asyncio.sleep(0.1)


async def _main(s):
    asyncio.create_task(_dump(s["flash_dir"].rstrip("/") + "/pinlog.json"))
    await main_sim.run(s)


def main(argv):
    s = main_sim.settings(argv)
    from iotlib.fsutil import makedirs
    makedirs(s["flash_dir"])
    sim.configure(flash_root=s["flash_dir"])
    asyncio.run(_main(s))


main(sys.argv[1:])
