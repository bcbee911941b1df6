"""Telemetry history: ingest (batches and heartbeat piggy-back), raw + 1-minute aggregates, retention, the query
API, refused input (counted), bounded Prometheus gauges — on SQLite and PostgreSQL."""
import time

import sqlalchemy as sa

from cptest import metric, wait_until
from picoiot.server import db as tables

TM = "/api/v1/namespaces/{ns}/devices/{dev}/telemetry"
FAST = dict(telemetry_flush_s=0.05)


def _post(server, d, readings):
    return server.client.post(f"/api/v1/devices/{d.device_id}/telemetry", headers=d.headers,
                              json={"readings": readings})


def _count(server, table):
    return server.sql(lambda c: c.execute(sa.select(sa.func.count()).select_from(table)).scalar())


def _query(server, dev="s1", role="viewer", **params):
    r = server.client.get(TM.format(ns="default", dev=dev), headers=server.auth(role), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_readings_are_stored_raw_and_as_minute_aggregates(server_factory):
    server = server_factory(**FAST)
    d = server.register("s1", device_type="sensors")
    now = int(time.time() * 1000)
    base = now - now % 60_000 - 10 * 60_000  # the start of a minute, 10 minutes ago
    first = [["temp", base + i * 1000, 20.0 + i] for i in range(10)]  # 20..29 in one minute
    r = _post(server, d, first)
    assert r.status_code == 202 and r.json() == {"accepted": 10}
    wait_until(lambda: _count(server, tables.telemetry_raw) == 10)
    # a second batch into the same minute, written by a later flush: the aggregate merges (min, max, sum, count)
    assert _post(server, d, [["temp", base + 30_000, 5.0], ["temp", base + 60_000, 100.0]]).status_code == 202
    wait_until(lambda: _count(server, tables.telemetry_raw) == 12)
    rows = server.sql(lambda c: c.execute(sa.select(tables.telemetry_1m).order_by(tables.telemetry_1m.c.bucket))
                      .mappings().all())
    assert [(r["bucket"], r["vmin"], r["vmax"], r["vsum"], r["n"]) for r in rows] == [
        (base, 5.0, 29.0, sum(range(20, 30)) + 5.0, 11), (base + 60_000, 100.0, 100.0, 100.0, 1)]
    # the API, a minute a point: from the aggregates
    out = _query(server, field="temp", since=base, until=base + 120_000, step=60_000)
    assert out["source"] == "1m" and out["step"] == 60_000
    assert out["points"] == [[base, (sum(range(20, 30)) + 5.0) / 11, 5.0, 29.0, 11], [base + 60_000, 100.0, 100.0,
                                                                                     100.0, 1]]
    # every reading on its own (1 s buckets) and another field is not mixed in
    assert _post(server, d, [["hum", base + 1000, 55.5]]).status_code == 202
    wait_until(lambda: _count(server, tables.telemetry_raw) == 13)
    out = _query(server, field="temp", since=base, until=base + 10_000, step=1000)
    assert out["source"] == "raw" and [p[1] for p in out["points"]] == [20.0 + i for i in range(10)]
    out = _query(server, field="temp", since=base, until=base + 120_000, step=30_000)  # raw, bucketed
    assert out["source"] == "raw" and [p[4] for p in out["points"]] == [10, 1, 1]
    latest = server.client.get(TM.format(ns="default", dev="s1") + "/latest", headers=server.auth("viewer")).json()
    assert latest["values"]["temp"] == [base + 60_000, 100.0] and latest["values"]["hum"] == [base + 1000, 55.5]


def test_beyond_the_raw_retention_the_query_reads_the_aggregates_and_old_rows_expire(server_factory):
    server = server_factory(telemetry_raw_retention_s=3600, telemetry_agg_retention_s=7200, telemetry_expire_s=0.1,
                            **FAST)
    d = server.register("s1", device_type="sensors")
    now = int(time.time() * 1000)
    minute = now - now % 60_000 - 30 * 60_000
    assert _post(server, d, [["temp", minute + i * 10_000, float(i)] for i in range(6)]).status_code == 202
    wait_until(lambda: _count(server, tables.telemetry_1m) == 1)
    # a range reaching back past the raw retention is answered from the 1-minute table, at whole minutes
    out = _query(server, field="temp", since=now - 3 * 3600_000, until=now, step=1000)
    assert out["source"] == "1m" and out["step"] == 60_000
    assert out["points"] == [[minute, 2.5, 0.0, 5.0, 6]]
    # rows past their retention are deleted by the server's own loop; recent ones stay
    old_raw, old_agg = now - 2 * 3600_000, now - 3 * 3600_000
    old_agg -= old_agg % 60_000

    def plant(c):
        c.execute(tables.telemetry_raw.insert().values(ns="default", device_id="s1", field="temp", ts=old_raw,
                                                       value=1.0))
        c.execute(tables.telemetry_1m.insert().values(ns="default", device_id="s1", field="temp", bucket=old_agg,
                                                      vmin=1, vmax=1, vsum=1, n=1))
    server.sql(plant)
    wait_until(lambda: _count(server, tables.telemetry_raw) == 6 and _count(server, tables.telemetry_1m) == 1)
    # and a reading older than the raw retention is refused
    r = _post(server, d, [["temp", now - 2 * 3600_000, 1.0]])
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "too_old"


def test_bad_readings_are_refused_whole_and_counted(server_factory):
    server = server_factory(**FAST)
    d = server.register("s1", device_type="sensors")
    now = int(time.time() * 1000)
    cases = [
        ([["temp", now, "hot"]], "bad_type"),
        ([["temp", now, True]], "bad_type"),
        ([["temp", float(now), 1.0]], "bad_type"),
        ([["temp", now + 3600_000, 1.0]], "future"),
        ([["<script>", now, 1.0]], "bad_field"),
        ([["temp", now, 1e300]], "not_finite"),
        ([["temp", now, 1.0], ["temp", now]], "bad_shape"),
    ]
    for readings, reason in cases:
        r = _post(server, d, readings)
        assert r.status_code == 422, (readings, r.text)
        assert r.json()["error"] == "invalid reading" and r.json()["detail"]["reason"] == reason
    # NaN is not JSON, but Python's parser takes it: refused as not finite
    r = server.client.post("/api/v1/devices/s1/telemetry", headers={**d.headers, "Content-Type": "application/json"},
                           content=b'{"readings": [["temp", %d, NaN], ["temp", %d, 1.0]]}' % (now, now))
    assert r.status_code == 422 and r.json()["detail"] == {"index": 0, "reason": "not_finite",
                                                           "message": "value must be finite and within ±1e15"}
    assert server.client.post("/api/v1/devices/s1/telemetry", headers=d.headers,
                              json={"readings": [["t", now, 1]] * 1001}).status_code == 422
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="future"') == 1
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="not_finite"') == 2
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="bad_type"') == 3
    time.sleep(0.2)  # a flush or two: nothing of the refused batches may be stored
    assert _count(server, tables.telemetry_raw) == 0
    # who may send and read
    assert server.client.post("/api/v1/devices/s1/telemetry", headers=server.auth("admin"),
                              json={"readings": []}).status_code == 403
    other = server.register("s2", device_type="sensors")
    assert _post(server, other, []).status_code == 202
    assert server.client.post("/api/v1/devices/s1/telemetry", headers=other.headers,
                              json={"readings": []}).status_code == 404
    assert server.client.get(TM.format(ns="other", dev="s1"), headers=server.auth("viewer", "default"),
                             params={"field": "temp"}).status_code == 404
    assert server.client.get(TM.format(ns="default", dev="s1"), headers=server.auth("viewer"),
                             params={"field": "temp", "since": 10, "until": 5}).status_code == 400
    assert server.client.get(TM.format(ns="default", dev="s1"), headers=server.auth("viewer")).status_code == 422


def test_a_flood_from_one_device_gets_429_and_heartbeats_go_on(server_factory):
    server = server_factory(telemetry_rate=10, telemetry_burst=100, **FAST)
    d = server.register("s1", device_type="sensors")
    quiet = server.register("s2", device_type="sensors")
    now = int(time.time() * 1000)
    batch = [["temp", now - i, 1.0] for i in range(100)]
    assert _post(server, d, batch).status_code == 202
    r = _post(server, d, batch)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["detail"]["burst"] == 100
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="rate_limited"') == 100
    # the flooding device's heartbeat is still answered, and another device's readings still go in
    hb = server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1})
    assert hb.status_code == 200 and hb.json()["ack"] == 1
    assert _post(server, quiet, [["temp", now, 2.0]]).status_code == 202


def test_readings_on_the_heartbeat_are_stored_and_bad_ones_dropped_not_the_heartbeat(server_factory):
    server = server_factory(**FAST)
    d = server.register("s1", device_type="sensors")
    r = server.client.post(d.services["heartbeat"], headers=d.headers,
                           json={"seq": 1, "t": {"temp": 21.5, "hum": "wet", "relay1": [[1, 2000], [0, 500]]}})
    assert r.status_code == 200 and r.json()["ack"] == 1
    wait_until(lambda: _count(server, tables.telemetry_raw) == 3)
    rows = server.sql(lambda c: c.execute(sa.select(tables.telemetry_raw.c.field, tables.telemetry_raw.c.value,
                                                    tables.telemetry_raw.c.ts)).all())
    by = {}
    for f, v, ts in rows:
        by.setdefault(f, []).append((ts, v))
    assert by["temp"][0][1] == 21.5 and sorted(v for _, v in by["relay1"]) == [0.0, 1.0]
    on, off = sorted(by["relay1"])
    assert off[0] - on[0] == 1500 and on[1] == 1.0  # the ages place the switch events in order
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="bad_type"') == 1
    # the readings are not stored in the device's heartbeat record
    dev = server.client.get("/api/v1/namespaces/default/devices/s1", headers=server.auth("viewer")).json()
    assert "t" not in (dev["heartbeat"] or {})


def test_latest_values_are_gauges_with_a_bounded_number_of_series(server_factory):
    server = server_factory(telemetry_gauge_series=2, **FAST)
    d = server.register("s1", device_type="sensors")
    now = int(time.time() * 1000)
    assert _post(server, d, [["temp", now, 21.25], ["hum", now, 40.0], ["co2", now, 400.0]]).status_code == 202
    text = server.client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("picoiot_telemetry_value{")]
    assert len(series) == 2
    assert 'picoiot_telemetry_value{device="s1",field="temp",namespace="default"} 21.25' in text
    assert metric(server.client, "picoiot_telemetry_series_dropped") == 1
    # deleting the device frees its series
    assert server.client.delete("/api/v1/namespaces/default/devices/s1", headers=server.auth("admin")).status_code \
        == 200
    assert "picoiot_telemetry_value{" not in server.client.get("/metrics").text


def test_a_device_cannot_invent_field_names_without_bound(server_factory):
    server = server_factory(telemetry_max_fields=3, **FAST)
    d = server.register("s1", device_type="sensors")
    now = int(time.time() * 1000)
    assert _post(server, d, [["a", now, 1.0], ["b", now, 1.0], ["a", now - 1, 2.0]]).status_code == 202
    r = _post(server, d, [["c", now, 1.0], ["d", now, 1.0]])
    assert r.status_code == 422 and r.json()["detail"] == {"index": 1, "reason": "too_many_fields",
                                                           "message": "at most 3 fields per device"}
    assert _post(server, d, [["c", now, 1.0], ["a", now, 3.0]]).status_code == 202  # the third is still free
    # on the heartbeat: the extra field is dropped, the rest kept, the heartbeat answered
    r = server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1, "t": {"e": 1, "b": 5}})
    assert r.status_code == 200
    assert metric(server.client, "picoiot_telemetry_readings_total", 'outcome="too_many_fields"') == 2
    latest = server.client.get(TM.format(ns="default", dev="s1") + "/latest", headers=server.auth("viewer")).json()
    assert set(latest["values"]) == {"a", "b", "c"} and latest["values"]["b"][1] == 5.0


def test_the_history_of_a_deleted_or_unknown_device_is_a_404_naming_it(server_factory):
    server = server_factory(**FAST)
    d = server.register("s1", device_type="sensors")
    assert _post(server, d, [["temp", int(time.time() * 1000), 21.0]]).status_code == 202
    wait_until(lambda: _count(server, tables.telemetry_raw) == 1)
    assert server.client.delete("/api/v1/namespaces/default/devices/s1", headers=server.auth("admin")).status_code \
        == 200
    for dev in ("s1", "never-enrolled"):
        for path in (TM, TM + "/latest"):
            r = server.client.get(path.format(ns="default", dev=dev), headers=server.auth("viewer"),
                                  params={"field": "temp"})
            assert r.status_code == 404, (path, r.text)
            assert r.json() == {"error": "unknown device", "detail": {"device_id": dev}}, (path, r.text)
