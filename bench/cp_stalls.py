#!/usr/bin/env python3
"""A `--server-launcher` for bench/controlplane_load.py that runs `picoiot server` and logs what stalls its event loop:

    .venv/bin/python bench/controlplane_load.py --devices 20000 --db postgres --server-launcher bench/cp_stalls.py
    PICOIOT_STALL_LOG=/tmp/stalls.log (default) — one line each, with a Unix timestamp:
      gc genN <ms> collected <n>      a collection over 5 ms (gc.callbacks)
      loop lag <ms>                   the event loop woke over 20 ms late for a 10 ms sleep
      db <function> cpu <ms> wall <ms> a database call whose worker thread used over 3 ms of CPU (it holds the GIL)
      housekeeping <ms>               one flush + sweep + gauges round
What found the flush's GIL-holding CPU, the full collections and the fleet's unfrozen caches (docs/benchmarks.md,
"The fast path"). Diagnostics only: it wraps functions of the running server, nothing of it ships.
"""
import gc
import os
import sys
import time

log = open(os.environ.get("PICOIOT_STALL_LOG", "/tmp/stalls.log"), "a")
_t: dict = {}


def _note(text: str) -> None:
    log.write(f"{time.time():.3f} {text}\n")
    log.flush()


def _gc(phase, info):
    if phase == "start":
        _t["t"] = time.perf_counter()
        return
    ms = (time.perf_counter() - _t.get("t", time.perf_counter())) * 1000
    if ms > 5:
        _note(f"gc gen{info['generation']} {ms:.1f} ms collected {info['collected']}")


gc.callbacks.append(_gc)

import picoiot.server.app as appmod  # noqa: E402
import picoiot.server.db as dbmod  # noqa: E402
import picoiot.server.liveness as livemod  # noqa: E402

_housekeeping_round = livemod.Liveness.housekeeping


async def _timed_round(self):
    t0 = time.perf_counter()
    await _housekeeping_round(self)
    _note(f"housekeeping {(time.perf_counter() - t0) * 1000:.1f} ms")


livemod.Liveness.housekeeping = _timed_round
_run_sync = dbmod.Database.run_sync


def _timed_run_sync(self, fn, *args):
    c0, t0 = time.thread_time(), time.perf_counter()
    try:
        return _run_sync(self, fn, *args)
    finally:
        cpu = (time.thread_time() - c0) * 1000
        if cpu > 3:
            _note(f"db {getattr(fn, '__name__', fn)} cpu {cpu:.1f} ms wall {(time.perf_counter() - t0) * 1000:.1f} ms")


dbmod.Database.run_sync = _timed_run_sync
_housekeeping_loop = appmod._housekeeping


async def _lag_monitor():
    import asyncio
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        lag = (time.perf_counter() - t0 - 0.01) * 1000
        if lag > 20:
            _note(f"loop lag {lag:.1f} ms")


async def _with_monitor(cp):
    import asyncio
    monitor = asyncio.create_task(_lag_monitor())
    try:
        await _housekeeping_loop(cp)
    finally:
        monitor.cancel()


appmod._housekeeping = _with_monitor

from picoiot.cli import app  # noqa: E402

sys.argv[0] = "picoiot"
app()
