# main_sim with the simulated board's pin transition log written out, for the end-to-end interlock test (tests-only).
# Every 100 ms <flash>/pinlog.json is written again with {"events": [[ms, pin, level], ...], "dropped": n} (temp +
# rename, so a reader never sees half a file), changed or not: its mtime tells a reader that it holds every switch
# made before then (devtest.Device.pinlog waits for that). Runs under the unix micropython (.mpy) and CPython.
import os
import sys
import json
import main_sim
import picosim as sim
from iotlib.compat import asyncio


async def _dump(path):
    while True:
        b = sim.board
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps({"events": [list(e) for e in b.pin_events], "dropped": b.pin_events_dropped}))
        os.rename(path + ".tmp", path)
        await asyncio.sleep(0.1)


async def _main(s):
    asyncio.create_task(_dump(s["flash_dir"].rstrip("/") + "/pinlog.json"))
    await main_sim.run(s)


main_sim.main(sys.argv[1:], _main)
