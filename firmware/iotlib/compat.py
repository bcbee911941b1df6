# Runtime shims shared by every iotlib module. Feature detection, never platform checks.
try:
    from micropython import const
except ImportError:  # CPython  # pragma: no cover
    def const(x):
        return x

import time

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
except AttributeError:  # CPython
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

try:
    import asyncio
except ImportError:  # pragma: no cover - very old MicroPython
    import uasyncio as asyncio  # noqa: F401


def sleep_ms(ms):
    return asyncio.sleep(ms / 1000)


# The device's wall clock: [source of raw epoch ms (None: the port's time, i.e. a board's RTC), offset ms, synced].
# A host's clock is NTP-disciplined, so it counts as synced; a board's entry point marks it unsynced
# (timesync.clock_unsynced: an rp2 RTC starts at 2021-01-01 on every power-on) and timesync.set_clock steps it from
# the registration answer and SNTP. Kept to this list and epoch_ms: every module loads compat, names cost heap.
_clk = [None, 0, True]


def epoch_ms():
    """Wall-clock milliseconds since 1970: the local clock plus the last step timesync.set_clock() made."""
    if _clk[0] is not None:
        return _clk[0]() + _clk[1]
    try:
        return time.time_ns() // 1000000 + _clk[1]
    except AttributeError:  # pragma: no cover - ports without time_ns
        return int(time.time()) * 1000 + _clk[1]


def urandom(n):
    import os
    return os.urandom(n)


def format_exc(exc):
    """The traceback of exc as a string, on both runtimes."""
    import io
    import sys
    buf = io.StringIO()
    if hasattr(sys, "print_exception"):
        sys.print_exception(exc, buf)
    else:  # CPython
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=buf)
    return buf.getvalue()


def mem_free():
    import gc
    try:
        return gc.mem_free()
    except AttributeError:  # CPython
        return -1


def memory_error(where):
    """Count a MemoryError the device survived and went on from (iotlib.metrics.memory_error). metrics is imported
    here, when it happens, not by the modules that call this: alarms and wsstream do not load it for this alone."""
    from iotlib import metrics
    metrics.memory_error(where)


def stream_writer(w):
    """w with MicroPython's awrite()/aclose(), which CPython's asyncio.StreamWriter lacks."""
    if not hasattr(w, "awrite"):
        from types import MethodType

        async def awrite(self, data):
            self.write(data if isinstance(data, bytes) else bytes(data))  # a reused buffer: copied
            await self.drain()

        async def aclose(self):
            self.close()
            await self.wait_closed()
        w.awrite = MethodType(awrite, w)
        w.aclose = MethodType(aclose, w)
    return w
