import time
import fwtest
from iotlib import metrics
from iotlib.compat import asyncio, sleep_ms


def _lines(text):
    return text.splitlines()


def test_counter_renders_help_type_and_total_suffix():
    r = metrics.Metrics()
    c = r.counter("http_requests", "Requests served.", labels=("method", "code"))
    c.inc(method="GET", code=200)
    c.inc(2, method="GET", code=200)
    c.inc(method="POST", code=401)
    assert c.value(method="GET", code=200) == 3
    lines = _lines(r.render())
    assert lines[0] == "# HELP http_requests_total Requests served."
    assert lines[1] == "# TYPE http_requests_total counter"
    assert 'http_requests_total{method="GET",code="200"} 3' in lines
    assert 'http_requests_total{method="POST",code="401"} 1' in lines
    # Declaring it with the suffix gives the same family.
    assert r.counter("http_requests_total", "Requests served.", labels=("method", "code")) is c


def test_gauge_set_inc_dec_and_unlabelled_starts_at_zero():
    r = metrics.Metrics()
    g = r.gauge("relays_on", "Relays switched on.")
    assert "relays_on 0" in _lines(r.render())
    g.set(3)
    g.inc()
    g.dec(2)
    assert g.value() == 2
    g.set(0.25)
    assert "relays_on 0.25" in _lines(r.render())


def test_label_values_and_help_are_escaped():
    r = metrics.Metrics()
    g = r.gauge("odd", 'Help with \\ and\nnewline "quotes"', labels=("path",))
    g.set(1, path='a"b\\c\nd')
    text = r.render()
    assert '# HELP odd Help with \\\\ and\\nnewline "quotes"\n' in text
    assert 'odd{path="a\\"b\\\\c\\nd"} 1\n' in text


def test_special_values():
    assert metrics.format_value(float("inf")) == "+Inf"
    assert metrics.format_value(float("-inf")) == "-Inf"
    assert metrics.format_value(float("nan")) == "NaN"
    assert metrics.format_value(True) == "1"
    assert metrics.format_value(2.0) == "2"
    assert metrics.format_value(1.5) == "1.5"


def test_bad_names_labels_and_misuse_raise_clearly():
    r = metrics.Metrics()
    fwtest.raises(ValueError, r.gauge, "1bad", "x")
    fwtest.raises(ValueError, r.gauge, "bad-name", "x")
    fwtest.raises(ValueError, r.gauge, "ok", "x", labels=("__reserved",))
    fwtest.raises(ValueError, r.gauge, "ok2", "x", labels=("a:b",))
    c = r.counter("c", "x", labels=("k",))
    e = fwtest.raises(ValueError, c.inc, other=1)
    assert "takes labels" in str(e)
    fwtest.raises(ValueError, c.inc)
    fwtest.raises(ValueError, c.inc, -1, k="a")
    fwtest.raises(ValueError, c.set, 5, k="a")
    fwtest.raises(ValueError, r.gauge, "c", "now a gauge")


def test_series_limit_drops_and_counts():
    r = metrics.Metrics()
    g = r.gauge("per_client", "x", labels=("client",))
    for i in range(metrics.Metric.MAX_SERIES + 5):
        g.set(i, client=i)
    assert len(g.series) == metrics.Metric.MAX_SERIES
    assert r.dropped == 5
    g.set(99, client=0)  # existing series still update
    assert g.value(client=0) == 99


def test_gauge_fn_reads_at_render_and_skips_failures():
    r = metrics.Metrics()
    box = [7]
    r.gauge_fn("queue_len", "Queued items.", lambda: box[0])
    assert "queue_len 7" in _lines(r.render())
    box[0] = 9
    assert "queue_len 9" in _lines(r.render())

    def boom():
        raise OSError(5)

    r.gauge_fn("sensor_temp", "Temperature.", boom)
    text = r.render()
    assert "# TYPE sensor_temp gauge" in text and "\nsensor_temp " not in text
    assert r.errors == 1
    r.gauge_fn("sensor_temp", "Temperature.", lambda: None)  # re-registration rebinds; None = no sample
    assert "\nsensor_temp " not in r.render() and r.errors == 1
    r.unregister("sensor_temp")
    assert "sensor_temp" not in r.render()


def test_builtins_render():
    r = metrics.register_builtins(metrics.Metrics())
    text = r.render()
    for name in ("iotlib_heap_free_bytes", "iotlib_heap_largest_free_block_bytes", "iotlib_loop_lag_ms",
                 "iotlib_loop_lag_max_ms"):
        assert "# TYPE %s gauge" % name in text
    free = metrics.heap_free()
    if free is not None:  # MicroPython: a real GC heap
        block = metrics.largest_free_block()
        assert 0 < block <= free + metrics.PROBE_STEP
        assert "\niotlib_heap_free_bytes " in text


def test_largest_free_block_sees_fragmentation():
    if metrics.heap_free() is None:
        return  # CPython has no GC heap to probe
    import gc
    gc.collect()
    whole = metrics.largest_free_block()
    # Fill the heap with small blocks, then free every other one: lots of free memory, no big hole.
    keep = [None] * 400
    n = 0
    try:
        while n < len(keep):
            keep[n] = bytearray(1024)
            n += 1
    except MemoryError:
        pass
    for i in range(0, n, 2):
        keep[i] = None
    gc.collect()
    frag = metrics.largest_free_block()
    free = metrics.heap_free()
    keep = None
    gc.collect()
    assert free > 8 * 1024  # plenty is free...
    assert frag < 4 * 1024 < whole  # ...but no large block


def test_heap_low_water_marks_remember_the_worst_since_boot():
    r = metrics.register_builtins(metrics.Metrics())
    if metrics.heap_free() is None:  # CPython: no GC heap, the marks stay unknown and are not rendered
        assert metrics.HEAP_LOW == [None, None] and "\niotlib_heap_free_min_bytes " not in r.render()
        return
    import gc
    metrics.HEAP_LOW[0] = metrics.HEAP_LOW[1] = None  # as at boot (earlier tests fragmented the heap on purpose)
    calm_block = metrics.largest_free_block()
    calm_free = metrics.HEAP_LOW[0]
    keep = [None] * 64
    n = 0
    try:
        while n < len(keep):  # fill the heap, free every other block: fragmented and fuller than before
            keep[n] = bytearray(1024)
            n += 1
    except MemoryError:
        pass
    for i in range(0, n, 2):
        keep[i] = None
    busy_block = metrics.largest_free_block()
    busy_free = metrics.HEAP_LOW[0]
    keep = None
    gc.collect()
    text = r.render()  # the heap is calm again: the current gauges recover, the marks keep the worst
    low_free, low_block = metrics.HEAP_LOW
    assert low_free <= busy_free < calm_free and low_block <= busy_block < calm_block
    assert metrics.largest_free_block() > busy_block
    assert "\niotlib_heap_free_min_bytes %d\n" % low_free in text
    assert "\niotlib_heap_largest_free_block_min_bytes %d\n" % low_block in text


def test_largest_free_block_probe_leaves_the_heap_as_it_found_it():
    # The probe allocates nearly all free memory at once; that block must be collectable afterwards, or the next
    # allocation (the /metrics answer itself) fails with MemoryError.
    if metrics.heap_free() is None:
        return  # CPython has no GC heap to probe
    import gc
    gc.collect()
    before = metrics.heap_free()
    block = metrics.largest_free_block()
    gc.collect()
    after = metrics.heap_free()
    assert block > before // 2
    assert after > before - 4096, (before, block, after)
    big = bytearray(block // 2)  # the space really is usable again
    assert len(big) == block // 2


def test_loop_lag_monitor_sees_a_blocked_loop():
    lag = metrics.LoopLag()

    async def main():
        task = asyncio.create_task(metrics.loop_lag_monitor(20, lag))
        await sleep_ms(50)
        time.sleep(0.3)  # a synchronous stretch: the monitor's sleep cannot end before it does
        await sleep_ms(50)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    fwtest.run(main())
    assert lag.samples >= 2
    assert lag.max_ms >= 200  # lower bound only: blocked 300 ms, period 20 ms
    r = metrics.register_builtins(metrics.Metrics(), lag)
    assert r.get("iotlib_loop_lag_max_ms").value() == lag.max_ms


def test_loop_lag_monitor_bounded_iterations():
    lag = metrics.LoopLag()
    fwtest.run(metrics.loop_lag_monitor(1, lag, iterations=3))
    assert lag.samples == 3 and lag.max_ms >= lag.last_ms >= 0


def test_module_level_registry():
    c = metrics.counter("fwtest_module_counter", "x")
    c.inc()
    assert metrics.REGISTRY.get("fwtest_module_counter") is c
    assert "fwtest_module_counter_total 1" in metrics.REGISTRY.render()
    metrics.REGISTRY.unregister("fwtest_module_counter")


def test_render_chunks_is_render_in_pieces():
    r = metrics.Metrics()
    r.counter("a", "A.", labels=("k",)).inc(k="x")
    r.gauge("b", "B.").set(2.5)
    r.gauge_fn("c", "C.", lambda: 7)
    chunks = list(r.render_chunks())
    assert len(chunks) == 3 and all(isinstance(c, bytes) for c in chunks)
    assert b"".join(chunks).decode() == r.render()
