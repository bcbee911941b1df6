"""Interop: what iotlib.metrics renders must parse with prometheus_client's own text-format parser (CPython only)."""
import math
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))
from iotlib import metrics  # noqa: E402


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_counters_and_gauges_with_labels_parse():
    r = metrics.Metrics()
    c = r.counter("http_requests", "Requests served by the device.", labels=("method", "code"))
    c.inc(method="GET", code=200)
    c.inc(4, method="POST", code="401")
    g = r.gauge("relay_state", "1 when the relay is on.", labels=("relay",))
    g.set(1, relay="pump")
    g.set(0, relay="fan")
    r.gauge("uptime_seconds", "Seconds since boot.").set(12.5)
    fams = _families(r.render())
    assert fams["http_requests"].type == "counter"
    assert fams["http_requests"].documentation == "Requests served by the device."
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams["http_requests"].samples}
    assert samples == {("http_requests_total", (("code", "200"), ("method", "GET"))): 1,
                       ("http_requests_total", (("code", "401"), ("method", "POST"))): 4}
    assert {s.labels["relay"]: s.value for s in fams["relay_state"].samples} == {"pump": 1, "fan": 0}
    assert fams["uptime_seconds"].type == "gauge" and fams["uptime_seconds"].samples[0].value == 12.5


def test_escaping_round_trips_through_the_parser():
    r = metrics.Metrics()
    nasty = 'quote " backslash \\ newline \n end'
    g = r.gauge("escaped", 'Help: back\\slash and\nnewline', labels=("v",))
    g.set(3, v=nasty)
    fam = _families(r.render())["escaped"]
    assert fam.documentation == 'Help: back\\slash and\nnewline'
    assert fam.samples[0].labels == {"v": nasty}


def test_special_float_values_parse():
    r = metrics.Metrics()
    r.gauge("pinf", "x").set(float("inf"))
    r.gauge("ninf", "x").set(float("-inf"))
    r.gauge("nan", "x").set(float("nan"))
    fams = _families(r.render())
    assert fams["pinf"].samples[0].value == math.inf
    assert fams["ninf"].samples[0].value == -math.inf
    assert math.isnan(fams["nan"].samples[0].value)


def test_builtins_and_callback_gauges_parse():
    r = metrics.register_builtins(metrics.Metrics())
    r.gauge_fn("queue_depth", "Queued alarms.", lambda: 4)
    fams = _families(r.render())
    assert fams["queue_depth"].samples[0].value == 4
    assert fams["iotlib_loop_lag_max_ms"].type == "gauge"
    # CPython has no GC heap: the heap gauges are declared but carry no sample.
    assert fams["iotlib_heap_free_bytes"].samples == []
