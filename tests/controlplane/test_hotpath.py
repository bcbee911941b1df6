"""The fast path for plain heartbeats and /health (server/hotpath.py), shown by behaviour against a real uvicorn:
it serves the happy case with the same answer as the FastAPI route, hands everything else to the app unchanged
(body replayed), and the batched `last_seen` flush it feeds keeps the newest value on SQLite and PostgreSQL."""
from __future__ import annotations

import gc
import json

import httpx
import pytest
import sqlalchemy as sa

from cptest import metric, wait_until
from picoiot.server import db as tables
from picoiot.server.liveness import Beat, _flush_rows
from picoiot.server.models import HeartbeatOut

ROUTE = "/api/v1/devices/{device_id}/heartbeat"
# the fast path reads requests as a server hands them over (body chunks, kept-alive connections), so: a real uvicorn
pytestmark = pytest.mark.real_server


def served(c: httpx.Client, outcome: str = "served") -> float:
    return metric(c, "picoiot_fast_path_requests_total", f'outcome="{outcome}",route="{ROUTE}"')


def test_a_plain_heartbeat_is_served_by_the_fast_path_with_the_routes_answer(server):
    d = server.register("fast-1")
    c = server.client
    before, fell = served(c), served(c, "fallback")
    hb = {"seq": 41, "uptime": 12.5, "mem_free": 81234, "rssi": -61, "config_version": 1, "state_version": 0}
    r = c.post(d.services["heartbeat"], headers=d.headers, json=hb)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = HeartbeatOut.model_validate(r.json())  # the documented schema
    assert body.ack == 41 and body.ttl == d.intervals["ttl"] and body.pending.ota is None
    assert served(c) == before + 1 and served(c, "fallback") == fell
    # counted like any request, under the FastAPI route's label
    assert metric(c, "picoiot_http_requests_total", f'method="POST",route="{ROUTE}",status="200"') >= 1
    assert metric(c, "picoiot_heartbeats_total") >= 1
    # the same answer as the route gives: a query parameter the route ignores takes the FastAPI path
    slow = c.post(d.services["heartbeat"], headers=d.headers, params={"x": 1}, json=hb)
    assert slow.status_code == 200 and served(c, "fallback") == fell + 1
    assert _same(r.json(), slow.json())


def _same(fast: dict, slow: dict) -> bool:
    """The same answer but for the clock."""
    return {**fast, "server_time": 0} == {**slow, "server_time": 0}


def test_a_held_heartbeat_is_served_by_the_fast_path_with_the_routes_answers(server):
    d = server.register("held-1")  # config version 1, state version 0, no OTA offer
    c = server.client
    cases = [  # (query, what the body says the device runs): each answers at once or after its short wait
        ({"wait": 5}, {"config_version": 0, "state_version": 0}),                  # a newer config: at once
        ({"wait": 0}, {"config_version": 1, "state_version": 0}),                  # no wait: a plain answer
        ({"wait": "0.2", "config_version": 1, "state_version": 0}, {}),           # nothing new: the wait ends
        ({"wait": 5, "config_version": 0}, {"config_version": 1, "state_version": 0}),  # knows of an older one
        ({"wait": 5, "ota": "1.2.3"}, {"config_version": 1, "state_version": 0}),  # an offer gone: at once
        ({"wait": "0.1", "ota": ""}, {"config_version": 1, "state_version": 0}),  # no offer, as known
    ]
    for query, runs in cases:
        before, fell = served(c), served(c, "fallback")
        fast = c.post(d.services["heartbeat"], headers=d.headers, params=query, json={"seq": 7, **runs})
        assert fast.status_code == 200 and served(c) == before + 1 and served(c, "fallback") == fell, query
        # the route's answer to the same request (an extra parameter it ignores sends it there)
        slow = c.post(d.services["heartbeat"], headers=d.headers, params={**query, "x": 1}, json={"seq": 7, **runs})
        assert slow.status_code == 200 and served(c, "fallback") == fell + 1, query
        assert _same(fast.json(), slow.json()), (query, fast.json(), slow.json())
        HeartbeatOut.model_validate(fast.json())


def test_a_held_heartbeat_on_the_fast_path_wakes_at_a_change(server):
    import threading
    d = server.register("held-2")
    c = server.client
    before = served(c)
    out = {}

    def poll():
        out["r"] = httpx.post(d.services["heartbeat"], headers=d.headers, params={"wait": 30},
                              json={"seq": 9, "config_version": 1, "state_version": 0}, timeout=40)

    t = threading.Thread(target=poll)
    t.start()
    wait_until(lambda: server.cp.metrics.longpolls.labels("heartbeat")._value.get() >= 1)
    assert t.is_alive()
    c.post("/api/v1/namespaces/default/devices/held-2/shadows/default", headers=server.auth("operator"),
           json={"state": {"desired": {"relay1": "on"}}})
    t.join(35)
    assert out["r"].status_code == 200 and out["r"].json()["pending"]["state_version"] == 1
    assert served(c) == before + 1


def test_a_query_the_fast_path_does_not_serve_gets_the_routes_answer(server):
    d = server.register("held-3")
    c = server.client
    runs = {"seq": 1, "config_version": 0, "state_version": 0}  # behind the server: a valid poll answers at once
    cases = [
        ("wait=-1", 422), ("wait=abc", 422), ("wait=100000", 422), ("config_version=2147483648", 422),
        ("ota=bad!", 422), ("state_version=-1", 422),
        ("wait=1e2", 200), ("wait=007", 200), ("wait=1&wait=2", 200), ("wait=5&x=1", 200),  # forms left to FastAPI
    ]
    fell = served(c, "fallback")
    for query, status in cases:
        r = c.post(d.services["heartbeat"] + "?" + query, headers=d.headers, json=runs)
        assert r.status_code == status, (query, r.text)
        if status == 422:
            assert r.json()["error"] == "invalid request"
    assert served(c, "fallback") == fell + len(cases)


def test_the_fast_path_records_what_the_route_records(server_factory):
    s = server_factory(heartbeat_flush_s=0.05)
    d = s.register("fast-rec")
    r = s.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 3, "mem_free": 999, "rssi": None})
    assert r.status_code == 200 and served(s.client) >= 1
    t = tables.devices

    def stored():
        return s.sql(lambda c: c.execute(sa.select(t.c.heartbeat).where(t.c.device_id == "fast-rec")).scalar())

    wait_until(lambda: (stored() or {}).get("seq") == 3)
    assert stored() == {"seq": 3, "mem_free": 999}  # model_dump(exclude_none=True), as through the route
    dev = s.client.get("/api/v1/namespaces/default/devices/fast-rec", headers=s.auth("viewer")).json()
    assert dev["online"] is True and dev["last_seen"]


def test_everything_unusual_falls_back_to_the_app_with_its_answers(server):
    d = server.register("fast-2")
    other = server.register("fast-3")
    c = server.client
    url = d.services["heartbeat"]
    fell = served(c, "fallback")
    cases = [
        (dict(json={"seq": 1}), 401),                                                     # no token
        (dict(json={"seq": 1}, headers={"Authorization": "Bearer not-a-jwt"}), 401),       # not a token
        (dict(json={"seq": 1}, headers={"Authorization": "Basic abc"}), 401),              # not bearer
        (dict(json={"seq": 1}, headers=server.auth("admin")), 403),                        # an operator's token
        (dict(json={"seq": -1}, headers=d.headers), 422),                                  # invalid body
        (dict(content=b"{", headers={**d.headers, "content-type": "application/json"}), 400),  # body replayed
        (dict(content=b"", headers={**d.headers, "content-type": "application/json"}), 422),   # empty body
        (dict(content=b'{"seq":1,"uptime":NaN}', headers={**d.headers, "content-type": "application/json"}), 422),
        (dict(json={"seq": 1, "firmware": "0.1\u0000"}, headers=d.headers), 422),        # NUL: not storable
        (dict(json={"seq": 1}, headers=d.headers, params={"wait": -1}), 422),              # a bad query
    ]
    for kw, status in cases:
        r = c.post(url, **kw)
        assert r.status_code == status, (kw, r.text)
        assert "error" in r.json()
    # another device's token on this device's path: the route's 404 (no existence leak)
    r = c.post(url, headers=other.headers, json={"seq": 1})
    assert r.status_code == 404
    assert served(c, "fallback") == fell + len(cases) + 1


def test_an_oversize_heartbeat_is_refused_with_413(server_factory):
    s = server_factory(max_body_bytes=512)
    d = s.register("fast-big")
    r = s.client.post(d.services["heartbeat"], headers=d.headers,
                      content=json.dumps({"seq": 1, "firmware": "x" * 2000}).encode(),
                      timeout=10)
    assert r.status_code == 413 and r.json()["detail"]["max_bytes"] == 512


def test_a_heartbeat_of_a_deleted_device_is_404_through_either_path(server):
    d = server.register("fast-del")
    assert server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1}).status_code == 200
    assert server.client.delete("/api/v1/namespaces/default/devices/fast-del", headers=server.auth()).status_code \
        in (200, 204)
    r = server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 2})
    assert r.status_code == 404 and r.json()["error"] == "unknown device"


def test_health_is_served_by_the_fast_path(server):
    c = server.client
    before = metric(c, "picoiot_fast_path_requests_total", 'outcome="served",route="/health"')
    r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"} and r.headers["x-picoiot-pid"].isdigit()
    assert metric(c, "picoiot_fast_path_requests_total", 'outcome="served",route="/health"') == before + 1
    assert c.post("/health").status_code == 405  # other methods: the app's answer


def test_flush_keeps_the_newest_last_seen_and_the_heartbeat_document(server):
    for dev in ("fl-1", "fl-2"):
        server.register(dev)
    t = tables.devices

    def write(batch):
        server.cp.db.run_sync(lambda c: _flush_rows(c, batch))

    def row(dev):
        return server.sql(lambda c: c.execute(sa.select(t.c.last_seen, t.c.heartbeat)
                                              .where(t.c.device_id == dev)).first())

    # heartbeats arrive as JSON text (serialised once, on arrival); the rows' order must not matter
    quoted = {"seq": 2, "firmware": 'q"uote\\ ü'}
    write({("default", "fl-2"): Beat(10**13 + 1, None), ("default", "fl-1"): Beat(10**13, json.dumps(quoted))})
    assert tuple(row("fl-1")) == (10**13, quoted)
    assert tuple(row("fl-2")) == (10**13 + 1, None)
    write({("default", "fl-1"): Beat(10**13 - 5, '{"seq":1}')})  # older than what is stored: ignored
    assert tuple(row("fl-1")) == (10**13, quoted)
    write({("default", "nobody"): Beat(10**13, '{"seq":1}')})  # unknown devices: nothing written, no error


def test_startup_moves_the_long_lived_heap_out_of_the_collectors_sight(server):
    assert gc.get_freeze_count() > 10_000


def test_an_expired_no_ota_answer_is_refreshed_by_one_query_while_heartbeats_go_on(server):
    import concurrent.futures
    import time

    from picoiot.server import ota
    devs = [server.register(f"ota-herd-{i}") for i in range(16)]
    assert server.client.post(devs[0].services["heartbeat"], headers=devs[0].headers, json={"seq": 1}).status_code \
        == 200  # "no assignment in default" is now known
    queries: list[str] = []

    def count(_conn, _cursor, statement, *_):
        if "ota_assignments" in statement:
            queries.append(statement)

    sa.event.listen(server.cp.db.engine, "before_cursor_execute", count)
    try:
        key = (id(server.cp), "default")
        assert key in ota._no_assignments
        ota._no_assignments[key] = time.monotonic() - 1  # expired: as 5 s later
        clients = [httpx.Client(base_url=server.url, timeout=20) for _ in devs]
        with concurrent.futures.ThreadPoolExecutor(len(devs)) as pool:
            answers = list(pool.map(lambda i: clients[i].post(devs[i].services["heartbeat"], headers=devs[i].headers,
                                                                json={"seq": 2}), range(len(devs))))
        for c in clients:
            c.close()
    finally:
        sa.event.remove(server.cp.db.engine, "before_cursor_execute", count)
    assert [r.status_code for r in answers] == [200] * len(devs)
    assert all(r.json()["pending"]["ota"] is None for r in answers)
    assert len(queries) == 1, queries  # one refresh, not one per heartbeat
    wait_until(lambda: ota._no_assignments[key] > time.monotonic())  # and it was stored


def test_a_growing_fleet_is_moved_out_of_the_collectors_sight_again(server_factory):
    from picoiot.server.app import refreeze_if_grown
    s = server_factory(gc_refreeze_entries=4)
    assert s.cp.frozen_entries == 0 and not refreeze_if_grown(s.cp)  # nothing new since start-up
    for i in range(2):  # each registration: a token and a version entry — 4 in all, one step
        s.register(f"grow-{i}")
    wait_until(lambda: s.cp.frozen_entries >= 4)  # the housekeeping loop froze them
    frozen = s.cp.frozen_entries
    s.register("grow-2")  # 2 more: less than a step since that freeze
    assert not refreeze_if_grown(s.cp) and s.cp.frozen_entries == frozen
    s.register("grow-3")  # a step again
    wait_until(lambda: s.cp.frozen_entries >= frozen + 4)
