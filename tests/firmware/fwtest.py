# The tiny test helpers shared by the dual-runtime firmware suite (pytest on CPython, fwrunner on MicroPython).
# Write tests as plain `def test_x():` functions with `assert`; no fixtures, no pytest imports.
import os

_counter = [0]


def raises(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception it raised; fail if it raised nothing or something else."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return e
    raise AssertionError("did not raise " + exc_type.__name__)


def run(coro):
    """Run a coroutine to completion on a fresh event loop and return its result."""
    try:
        import asyncio
    except ImportError:  # pragma: no cover
        import uasyncio as asyncio
    return asyncio.run(coro)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def rmtree(path):
    if not _exists(path):
        return
    if os.stat(path)[0] & 0x4000:
        for name in os.listdir(path):
            rmtree(path + "/" + name)
        os.rmdir(path)
    else:
        os.remove(path)


def tmpdir(name="t"):
    """A fresh empty directory for one test (removed first if it exists)."""
    base = os.getenv("PICOIOT_FWTEST_TMP")
    if not base:
        base = "/tmp/picoiot-fwtest-%d" % (os.getpid() if hasattr(os, "getpid") else 0)
    _counter[0] += 1
    if not _exists(base):
        os.mkdir(base)
    path = "%s/%s-%d" % (base, name, _counter[0])
    rmtree(path)
    os.mkdir(path)
    return path
