"""SensorsController end to end: /sensors, a real WebSocket client (websockets) with each way of passing the token,
bad client messages, config hot-reload of the sampling rate without a restart, an invalid config refused with the last
good one kept."""
import asyncio
import json
import statistics

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devtest import wait_until

FIELDS = ["temperature", "humidity", "pressure", "cpu_temp"]


@pytest.fixture(scope="module")
def sensors(device_factory):
    return device_factory("sensors", {"sampling": {"interval_ms": 500, "fields": FIELDS}})


async def frames(ws, n, timeout=20):
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = json.loads(await ws.recv())
            if "seq" in msg:
                out.append(msg)
    return out


def test_sensors_snapshot(sensors):
    assert sensors.get("/sensors", role=None).status_code == 401
    r = sensors.get("/sensors", role="viewer")
    assert r.status_code == 200, r.text
    snap = r.json()
    assert set(FIELDS) <= set(snap["values"]), snap
    assert isinstance(snap["values"]["temperature"], (int, float))
    assert snap["interval_ms"] == 500


async def test_websocket_frames_with_each_token_form(sensors):
    tok = sensors.token("viewer")
    ways = [dict(uri=sensors.ws_url, additional_headers={"Authorization": f"Bearer {tok}"}),
            dict(uri=f"{sensors.ws_url}?token={tok}"),
            dict(uri=sensors.ws_url, subprotocols=["picoiot", f"bearer.{tok}"])]
    for kw in ways:
        async with connect(**kw, open_timeout=10) as ws:
            got = await frames(ws, 3)
        seqs = [f["seq"] for f in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3, seqs
        assert all(set(FIELDS) <= set(f["values"]) and isinstance(f["ts"], int) for f in got), got


async def test_websocket_refused_without_a_valid_token(sensors):
    for kw in (dict(uri=sensors.ws_url), dict(uri=f"{sensors.ws_url}?token=forged")):
        with pytest.raises(InvalidStatus) as e:
            async with connect(**kw, open_timeout=10):
                pass
        assert e.value.response.status_code == 401
    assert sensors.get("/health", role=None).status_code == 200


async def test_websocket_subscribe_and_bad_messages(sensors):
    tok = sensors.token("viewer")
    async with connect(f"{sensors.ws_url}?token={tok}", open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "subscribe", "fields": ["temperature"]}))
        async with asyncio.timeout(10):
            while (msg := json.loads(await ws.recv())).get("type") != "subscribed":
                pass
        assert msg["fields"] == ["temperature"]
        got = await frames(ws, 2)
        assert all(set(f["values"]) == {"temperature"} for f in got), got
        await ws.send(json.dumps({"type": "subscribe", "fields": ["nosuch"]}))  # refused, changes nothing
        async with asyncio.timeout(10):
            while (msg := json.loads(await ws.recv())).get("type") != "error":
                pass
        assert "nosuch" in msg["error"]
        got = await frames(ws, 1)
        assert set(got[0]["values"]) == {"temperature"}
        await ws.send(json.dumps({"type": "launch"}))  # unknown type: closed with 1003
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    assert ws.close_code == 1003, ws.close_code
    async with connect(f"{sensors.ws_url}?token={tok}", open_timeout=10) as ws:
        await ws.send("not json")
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
    assert ws.close_code == 1003, ws.close_code
    assert sensors.get("/sensors").status_code == 200


def _median_gap(got):
    return statistics.median(b["ts"] - a["ts"] for a, b in zip(got, got[1:]))


async def test_config_hot_reload_changes_the_sampling_rate_without_restart(sensors):
    before = sensors.info()
    tok = sensors.token("viewer")
    async with connect(f"{sensors.ws_url}?token={tok}", open_timeout=10) as ws:
        slow = await frames(ws, 4)
        await asyncio.to_thread(sensors.configure, {"sampling": {"interval_ms": 100}})
        # frames sampled before the device applied the change may still be queued: skip them by their seq
        mark = (await asyncio.to_thread(sensors.get, "/sensors")).json()["seq"]
        while (await frames(ws, 1))[0]["seq"] <= mark:
            pass
        fast = await frames(ws, 12)
    # the device's own timestamps, not the test's clock: loose bounds around 500 ms and 100 ms
    assert 300 <= _median_gap(slow) <= 1500, [f["ts"] for f in slow]
    assert _median_gap(fast) <= 200, [f["ts"] for f in fast]
    assert fast[0]["seq"] > slow[-1]["seq"], "the sample counter must go on: no restart"
    after = sensors.info()
    assert after["uptime_s"] >= before["uptime_s"] and after["interval_ms"] == 100
    assert sensors.child.restarts == 0 and sensors.child.running()
    sensors.configure({"sampling": {"interval_ms": 500}})


def test_invalid_config_refused_and_last_good_kept(sensors, cp):
    good = sensors.info()["config_version"]
    bad = cp.patch_config(sensors.id, {"sampling": {"fields": ["temperature", "nosuchfield"]}})  # server accepts
    assert bad > good

    def rejected():
        rep = cp.config(sensors.id).get("report") or {}
        return rep if rep.get("version") == bad and rep.get("status") == "rejected" else None
    rep = wait_until(rejected, 30, "the device to report the config rejected")
    assert "nosuchfield" in json.dumps(rep)
    info = sensors.info()
    assert info["config_version"] == good and sorted(info["fields"]) == sorted(FIELDS), info
    snap = sensors.get("/sensors").json()
    assert set(FIELDS) <= set(snap["values"])
    # a fixed config is applied
    fixed = cp.patch_config(sensors.id, {"sampling": {"fields": ["temperature", "humidity"]}})
    wait_until(lambda: sensors.info()["config_version"] == fixed, 30, "the fixed config to be applied")
    assert sorted(sensors.info()["fields"]) == ["humidity", "temperature"]
