# What every part of the simulated board shares: the current board, the reset exception and the scripted-value reader.
# The other modules of picosim import only this (and iotlib.compat), never each other's parents: no import circles.
from iotlib.compat import const

#: Exit status of a process ended by an uncaught SimulatedReset (EX_TEMPFAIL: "start me again"); the cause is on flash.
RESET_EXIT_CODE = const(75)

#: [the board picosim.configure() made last]: the peripherals (ADC, I2C, RTC, sensor models) read their board here.
current = [None]

#: boots of any board in this process so far; each boot gets the next number (hal re-reads the reset cause on a new one)
boots = [0]


class SimulatedReset(SystemExit):
    """The simulated device reset (hal.reset(), soft_reset() or a starved WDT). A SystemExit, so it ends asyncio.run
    on both runtimes like a reset ends everything on a board, and an uncaught one ends the process with status
    RESET_EXIT_CODE; `.cause` says why. In a test, catch it and call `board.boot()` to go on."""

    def __init__(self, cause):
        super().__init__(RESET_EXIT_CODE)
        self.cause = cause


def sample(store, key, now):
    """A scripted value: a number (constant), a list (one item per read, the last one sticks) or a callable f(now_ms);
    an exception instance reached in a list is raised."""
    v = store[key]
    if isinstance(v, list):
        x = v.pop(0) if len(v) > 1 else v[0]
    elif callable(v):
        x = v(now)
    else:
        x = v
    if isinstance(x, BaseException):
        raise x
    return x
