# main_sim for bench/cloud_to_relay.py: every pin transition of the simulated board with the wall-clock time it
# happened (epoch ms, the clock the operator's write is stamped with), written to <flash>/pins.json every 20 ms when it
# changed. Settings key "longpoll": false makes the device heartbeat-paced (the baseline). Unix micropython and CPython.
import os
import sys
import json
import main_sim
import picosim as sim
from iotlib.compat import asyncio, epoch_ms


def _hook(events):
    board = sim.board
    orig = board._pin_event

    def record(pid, level):
        events.append((epoch_ms(), pid, level))
        orig(pid, level)
    board._pin_event = record


async def _dump(path, events):
    seen = -1
    while True:
        if len(events) != seen:
            seen = len(events)
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps([list(e) for e in events[-64:]]))
            os.rename(path + ".tmp", path)
        await asyncio.sleep(0.02)


async def _main(s):
    if s.get("longpoll") is False:
        from iotlib.device import Device
        Device.longpoll = False
    events = []
    _hook(events)
    asyncio.create_task(_dump(s["flash_dir"].rstrip("/") + "/pins.json", events))
    await main_sim.run(s)


main_sim.main(sys.argv[1:], _main)
