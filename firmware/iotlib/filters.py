# Sensor value filters (ESPHome's sensor filters, the subset a Pico needs). A chain is built from config as a list of
# one-key objects, applied in order:
#   [{"calibrate": {"scale": 1.02, "offset": -0.5}}   or {"calibrate": [[raw, true], [raw, true], …]} (least squares)
#    {"clamp": {"min": -40, "max": 85}},
#    {"moving_average": 5},           mean of the last N values
#    {"ema": 0.3},                    exponential moving average, alpha in (0, 1]
#    {"median": 5},                   median of the last N values
#    {"delta": 0.2},                  publish only when the value moved at least this much since the last publication
#    {"throttle_ms": 5000}]           publish at most once per interval
# run_chain(filters, value, now_ms) returns the value to publish, or SKIP when the chain suppresses it (the field then
# keeps its last published value, as in ESPHome). None in means a failed read: it passes straight through as None.
from iotlib.compat import ticks_diff

SKIP = object()

KINDS = ("calibrate", "clamp", "moving_average", "ema", "median", "delta", "throttle_ms")


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Calibrate:
    def __init__(self, arg):
        if isinstance(arg, dict):
            self.scale = arg.get("scale", 1)
            self.offset = arg.get("offset", 0)
        else:  # linear least squares through [raw, true] points
            n = len(arg)
            sx = sum(p[0] for p in arg)
            sy = sum(p[1] for p in arg)
            sxx = sum(p[0] * p[0] for p in arg)
            sxy = sum(p[0] * p[1] for p in arg)
            self.scale = (n * sxy - sx * sy) / (n * sxx - sx * sx)
            self.offset = (sy - self.scale * sx) / n

    def apply(self, v, now):
        return v * self.scale + self.offset


class Clamp:
    def __init__(self, arg):
        self.lo = arg.get("min")
        self.hi = arg.get("max")

    def apply(self, v, now):
        if self.lo is not None and v < self.lo:
            return self.lo
        if self.hi is not None and v > self.hi:
            return self.hi
        return v


class MovingAverage:
    def __init__(self, n):
        self.buf = [0.0] * n  # preallocated ring: no allocation per sample
        self.n = 0
        self.i = 0
        self.total = 0.0

    def apply(self, v, now):
        size = len(self.buf)
        if self.n == size:
            self.total -= self.buf[self.i]
        else:
            self.n += 1
        self.buf[self.i] = v
        self.total += v
        self.i = (self.i + 1) % size
        return self.total / self.n


class Ema:
    """Exponential moving average: v' = a·v + (1-a)·v'."""

    def __init__(self, alpha):
        self.a = alpha
        self.v = None

    def apply(self, v, now):
        self.v = v if self.v is None else self.a * v + (1 - self.a) * self.v
        return self.v


class Median:
    """Median of the last N values (rejects single spikes, e.g. an I2C glitch)."""

    def __init__(self, n):
        self.buf = []
        self.n = n

    def apply(self, v, now):
        self.buf.append(v)
        if len(self.buf) > self.n:
            self.buf.pop(0)
        s = sorted(self.buf)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


class Delta:
    def __init__(self, d):
        self.d = d
        self.last = None

    def apply(self, v, now):
        if self.last is not None and abs(v - self.last) < self.d:
            return SKIP
        self.last = v
        return v


class Throttle:
    def __init__(self, ms):
        self.ms = ms
        self.last = None

    def apply(self, v, now):
        if self.last is not None and ticks_diff(now, self.last) < self.ms:
            return SKIP
        self.last = now
        return v


_CLASSES = {"calibrate": Calibrate, "clamp": Clamp, "moving_average": MovingAverage, "ema": Ema, "median": Median,
            "delta": Delta, "throttle_ms": Throttle}


def validate(chain, path="filters"):
    """Problems of a filter chain config as "path[i].kind: problem" strings."""
    if not isinstance(chain, list):
        return [path + ": must be a list"]
    errs = []
    for i, f in enumerate(chain):
        p = "%s[%d]" % (path, i)
        if not isinstance(f, dict) or len(f) != 1:
            errs.append(p + ": must be an object with exactly one of " + ", ".join(KINDS))
            continue
        kind = list(f)[0]
        arg = f[kind]
        p += "." + str(kind)
        if kind not in _CLASSES:
            errs.append(p + ": unknown filter (known: " + ", ".join(KINDS) + ")")
        elif kind == "calibrate":
            if isinstance(arg, dict):
                if not all(_num(arg.get(k, 0)) for k in ("scale", "offset")) or set(arg) - {"scale", "offset"}:
                    errs.append(p + ": needs numeric scale and/or offset")
            elif (not isinstance(arg, list) or len(arg) < 2
                  or not all(isinstance(q, list) and len(q) == 2 and _num(q[0]) and _num(q[1]) for q in arg)):
                errs.append(p + ": needs {scale, offset} or at least two [raw, true] points")
            elif len(set(q[0] for q in arg)) < 2:
                errs.append(p + ": points need at least two different raw values")
        elif kind == "clamp":
            if not isinstance(arg, dict) or not arg or set(arg) - {"min", "max"} or \
                    not all(_num(v) for v in arg.values()):
                errs.append(p + ": needs numeric min and/or max")
            elif "min" in arg and "max" in arg and arg["min"] > arg["max"]:
                errs.append(p + ": min is above max")
        elif kind in ("moving_average", "median"):
            if not isinstance(arg, int) or isinstance(arg, bool) or not 1 <= arg <= 64:
                errs.append(p + ": window must be an integer 1-64")
        elif kind == "ema":
            if not _num(arg) or not 0 < arg <= 1:
                errs.append(p + ": alpha must be a number in (0, 1]")
        elif not _num(arg) or arg < 0:
            errs.append(p + ": must be a number >= 0")
    return errs


def build(chain):
    """A list of filter objects from a validated chain config."""
    out = []
    for f in chain or ():
        kind = list(f)[0]
        out.append(_CLASSES[kind](f[kind]))
    return out


def run_chain(filters, v, now):
    if v is None:
        return None
    for f in filters:
        v = f.apply(v, now)
        if v is SKIP:
            return SKIP
    return v
