# A small metrics registry rendering the Prometheus text exposition format 0.0.4 (what /metrics serves).
# Counters and gauges with labels, callback gauges, and the device's built-in gauges (heap, largest free block,
# event-loop lag). Updating a metric never raises for a runtime reason: a label set past the series limit is dropped
# and counted.
from .compat import const, ticks_ms, ticks_diff, sleep_ms

_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:"
_NAME_REST = _NAME_FIRST + "0123456789"


def _check_name(name, label=False):
    first = _NAME_FIRST[:-1] if label else _NAME_FIRST  # label names have no ':'
    rest = _NAME_REST.replace(":", "") if label else _NAME_REST
    ok = bool(name) and name[0] in first and not (label and name.startswith("__"))
    for c in name:
        if c not in rest:
            ok = False
    if not ok:
        raise ValueError("invalid %s name: %r" % ("label" if label else "metric", name))


def escape_label(v):
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(v):
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v):
    if v is True or v is False:
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if v != v:
        return "NaN"
    if v - v != 0:
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class Metric:
    """One metric family: a value per label set. Counters only go up (inc); gauges are set, inc'd or dec'd.
    A callback gauge (fn set; see Metrics.gauge_fn) has no stored value: fn() is read at render time."""

    #: Most label sets one metric holds; more would let a bad label (an id, a path) eat the heap.
    MAX_SERIES = 32

    def __init__(self, registry, name, help, kind, labels=(), fn=None):
        _check_name(name)
        for ln in labels:
            _check_name(ln, True)
        self.registry = registry
        self.name = name
        self.help = help
        self.kind = kind
        self.labelnames = tuple(labels)
        self.fn = fn
        self.series = {}  # tuple of label values -> number
        if not self.labelnames and fn is None:
            self.series[()] = 0  # an unlabelled metric is exposed (as 0) from the start

    def _key(self, labels):
        if len(labels) != len(self.labelnames):
            raise ValueError("%s takes labels %s, got %s" % (self.name, self.labelnames, tuple(labels)))
        try:
            return tuple(str(labels[n]) for n in self.labelnames)
        except KeyError:
            raise ValueError("%s takes labels %s, got %s" % (self.name, self.labelnames, tuple(labels)))

    def _slot(self, key):
        if key in self.series:
            return True
        if len(self.series) >= self.MAX_SERIES:
            self.registry.dropped += 1
            return False
        self.series[key] = 0
        return True

    # The amount is named _n/_v so that any label name (even "n" or "v") can be passed as a keyword.
    def inc(self, _n=1, **labels):
        self.inc_key(self._key(labels), _n)

    def inc_key(self, key, _n=1):
        """inc() with the label values as a tuple of str the caller made once (a hot path: no dict, no tuple per
        call). The caller keeps it right: one value per label name."""
        if self.kind == "counter" and _n < 0:
            raise ValueError("counter %s cannot decrease" % self.name)
        if self._slot(key):
            self.series[key] += _n

    def dec(self, _n=1, **labels):
        if self.kind == "counter":
            raise ValueError("counter %s cannot decrease" % self.name)
        self.inc(-_n, **labels)

    def set(self, _v, **labels):
        if self.kind == "counter":
            raise ValueError("counter %s cannot be set; use inc()" % self.name)
        key = self._key(labels)
        if self._slot(key):
            self.series[key] = _v

    def value(self, **labels):
        if self.fn is not None:
            for _, v in self.samples():
                return v
            return None
        return self.series.get(self._key(labels), 0)

    def exposed_name(self):
        # Prometheus convention (and prometheus_client's own output): a counter's samples end in _total.
        if self.kind == "counter" and not self.name.endswith("_total"):
            return self.name + "_total"
        return self.name

    def samples(self):
        if self.fn is None:
            return self.series.items()
        # A failing or unavailable source (None) yields no sample rather than a wrong one.
        try:
            v = self.fn()
        except Exception:
            self.registry.errors += 1
            return ()
        return () if v is None else (((), v),)

    def render(self, out):
        name = self.exposed_name()
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, escape_help(self.help), name, self.kind))
        for key, v in self.samples():
            if key:
                lab = ",".join('%s="%s"' % (n, escape_label(key[i])) for i, n in enumerate(self.labelnames))
                out.append("%s{%s} %s\n" % (name, lab, format_value(v)))
            else:
                out.append("%s %s\n" % (name, format_value(v)))


class Metrics:
    """A registry of metric families, rendered in registration order."""

    def __init__(self):
        self.metrics = {}
        self.order = []
        self.dropped = 0  # label sets refused by MAX_SERIES
        self.errors = 0  # callback gauges that raised while rendering

    def _add(self, m):
        old = self.metrics.get(m.name)
        if old is not None:
            if old.kind != m.kind or old.labelnames != m.labelnames or (old.fn is None) != (m.fn is None):
                raise ValueError("metric %s already registered differently" % m.name)
            return old  # idempotent: a module may declare its metrics each time it is constructed
        self.metrics[m.name] = m
        self.order.append(m)
        return m

    def counter(self, name, help, labels=()):
        if name.endswith("_total"):
            name = name[:-6]
        return self._add(Metric(self, name, help, "counter", labels))

    def gauge(self, name, help, labels=()):
        return self._add(Metric(self, name, help, "gauge", labels))

    def gauge_fn(self, name, help, fn):
        """A gauge read from fn() at render time (fn returns a number, or None for 'not available')."""
        m = self._add(Metric(self, name, help, "gauge", (), fn))
        m.fn = fn  # re-registration rebinds the callback (e.g. a new manager instance after a restart)
        return m

    def get(self, name):
        return self.metrics.get(name)

    def unregister(self, name):
        m = self.metrics.pop(name, None)
        if m is not None:
            self.order.remove(m)

    def render(self):
        out = []
        for m in self.order:
            m.render(out)
        return "".join(out)

    def render_chunks(self):
        """The same text as render(), as a generator of UTF-8 chunks (one per metric): the device's /metrics writes
        them as they are made, so it never needs the whole answer (≈ 1.5K) in one piece of a fragmented heap."""
        for m in self.order:
            out = []
            m.render(out)
            yield "".join(out).encode()


REGISTRY = Metrics()


def counter(name, help, labels=()):
    return REGISTRY.counter(name, help, labels)


def gauge(name, help, labels=()):
    return REGISTRY.gauge(name, help, labels)


def gauge_fn(name, help, fn):
    return REGISTRY.gauge_fn(name, help, fn)


#: The heap's low-water marks since boot: [lowest free heap after a collection, smallest largest-free-block], both
#: sampled by largest_free_block() (at each /metrics and once a minute; None until then). How close the device ran to
#: the edge, readable on real hardware (/metrics, /info). Free heap read without a collection says little: garbage
#: counts as used until the collector runs, so it always nears 0 just before one.
HEAP_LOW = [None, None]


def _low(i, v):
    if v is not None and (HEAP_LOW[i] is None or v < HEAP_LOW[i]):
        HEAP_LOW[i] = v
    return v


def heap_free():
    try:
        import gc
        return gc.mem_free()
    except (ImportError, AttributeError):  # CPython: no GC heap to report
        return None


#: MemoryErrors survived since boot by where ("request", "ws", "config", "alarms", "ota"): the heartbeat carries it
#: (mem_errors), so the control plane hears of them at the device's next contact.
MEM_ERRORS = {}


def memory_error(where):
    """Count a MemoryError the device survived and went on from: /metrics shows it as iotlib_memory_errors_total{where}
    and the next heartbeat reports it. Registered at the first one: a device that never runs short pays nothing.
    Never raises: it is called where the heap has just run out, and counting must not be what fails next."""
    try:
        MEM_ERRORS[where] = MEM_ERRORS.get(where, 0) + 1
        REGISTRY.counter("iotlib_memory_errors", "MemoryErrors the device survived and went on from, by where.",
                         ("where",)).inc(where=where)
    except MemoryError:
        pass


#: Granularity of the largest-free-block probe (bytes); MicroPython's GC allocates in 16-byte blocks.
PROBE_STEP = 256
#: Most allocation attempts one probe makes: each failed attempt costs a garbage collection (~ms on a Pico).
PROBE_TRIES = 8


def _fits(size):
    # The probe block must not outlive this call: bound to a local in the caller's frame, the VM's value stack keeps
    # a stale pointer to it that the conservative GC honours, so the whole block (most of the free heap) stayed
    # allocated and the /metrics answer itself then failed with MemoryError.
    try:
        bytearray(size)
        return True
    except MemoryError:
        return False


def largest_free_block():
    """Largest single allocation that succeeds now (bytes, within PROBE_STEP), or None where there is no GC heap.

    MicroPython has no cheap API for it: micropython.mem_info(1) prints the whole heap map to stdout (slow, and
    not capturable on a board). We probe instead: collect, try gc.mem_free() bytes at once (succeeds on an unfragmented
    heap: one allocation), else bisect with at most PROBE_TRIES attempts, then collect. It runs when /metrics is
    rendered and once a minute from the loop-lag monitor; its cost is up to PROBE_TRIES + 2 collections."""
    import gc
    try:
        gc.collect()  # garbage counts as used until collected: without this the bound below is far too low
        hi = _low(0, gc.mem_free())
    except AttributeError:
        return None
    lo = 0
    best = 0
    size = hi - hi % PROBE_STEP
    tries = 0
    while size > lo and tries < PROBE_TRIES:
        tries += 1
        if _fits(size):
            best = lo = size
        else:
            hi = size
        size = (lo + hi) // 2
        size -= size % PROBE_STEP
        if size <= lo:
            break
    gc.collect()  # free the probe now instead of leaving the heap looking full until the next collection
    return _low(1, best)


class LoopLag:
    """How late the event loop wakes a sleeper: a long synchronous stretch (a blocking call, a big JSON parse)
    shows here, and on a Pico W anything near the 8.3 s watchdog limit resets the board."""

    def __init__(self):
        self.last_ms = 0
        self.max_ms = 0
        self.samples = 0

    def record(self, lag):
        if lag < 0:
            lag = 0
        self.last_ms = lag
        self.samples += 1
        if lag > self.max_ms:
            self.max_ms = lag


LOOP_LAG = LoopLag()


#: Event-loop ticks between two probes of the largest free block by the monitor (each costs up to PROBE_TRIES
#: collections, so not every tick; /metrics probes too): 600 ticks of 100 ms = a minute.
_PROBE_EVERY = const(600)


async def loop_lag_monitor(period_ms=100, lag=None, iterations=-1):
    """Sleep period_ms again and again and record how much later than asked each sleep returns; also probe the heap's
    low-water marks every _PROBE_EVERY ticks (largest_free_block).
    Runs until cancelled (or for `iterations` rounds, for tests)."""
    lag = LOOP_LAG if lag is None else lag
    n = 0
    while iterations != 0:
        t0 = ticks_ms()
        await sleep_ms(period_ms)
        lag.record(ticks_diff(ticks_ms(), t0) - period_ms)
        n += 1
        if n >= _PROBE_EVERY:
            n = 0
            largest_free_block()
        if iterations > 0:
            iterations -= 1


def _tls_reserve():
    import sys
    h = sys.modules.get("iotlib.http")  # not imported for it: a device without a control plane has no client
    return h.HTTPClient.held if h else 0


def register_builtins(registry=None, lag=None):
    """Register the device's built-in gauges (idempotent)."""
    r = REGISTRY if registry is None else registry
    lag = LOOP_LAG if lag is None else lag
    r.gauge_fn("iotlib_heap_free_bytes", "Free bytes in the MicroPython GC heap (gc.mem_free()).", heap_free)
    r.gauge_fn("iotlib_heap_largest_free_block_bytes",
               "Largest allocation that succeeded when probed (bytes, 256-byte granularity).", largest_free_block)
    r.gauge_fn("iotlib_heap_free_min_bytes", "Lowest free heap after a collection since boot (bytes; probed at each "
               "/metrics and once a minute).", lambda: HEAP_LOW[0])
    r.gauge_fn("iotlib_heap_largest_free_block_min_bytes",
               "Smallest largest-free-block probed since boot (bytes): how fragmented the heap got.",
               lambda: HEAP_LOW[1])
    r.gauge_fn("iotlib_tls_reserve_bytes", "Heap block held in one piece for the next TLS handshake (bytes; 0: none, "
               "or plain http).", _tls_reserve)
    r.gauge_fn("iotlib_loop_lag_ms", "Lateness of the last event-loop wake-up (ms).", lambda: lag.last_ms)
    r.gauge_fn("iotlib_loop_lag_max_ms", "Largest event-loop wake-up lateness since boot (ms).", lambda: lag.max_ms)
    return r
