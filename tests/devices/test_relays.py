"""RelaysController end to end: REST with each role (401/403/429), bad input, connection floods, desired state through
the control plane and reported back, the interlock under concurrent requests."""
import json
import socket
import subprocess
import threading
import time

import jwt
import pytest

from devtest import wait_until

PUMPS = {"relays": {"pump_a": {"pin": 18, "interlock": "pump"}, "pump_b": {"pin": 19, "interlock": "pump"}}}


@pytest.fixture(scope="module")
def relays(device_factory):
    return device_factory("relays", PUMPS, pinlog=True)  # the simulated board's pin log is written to flash


def _error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def test_roles_over_rest(relays):
    _error(relays.get("/gpio", role=None), 401)
    r = relays.get("/gpio", role=None, headers={"Authorization": "Bearer not-a-token"})
    _error(r, 401)
    assert r.headers["WWW-Authenticate"] == "Bearer"
    forged = jwt.encode({"role": "admin", "sub": "x", "exp": 2**31 - 1}, "0" * 64, algorithm="HS256")
    _error(relays.get("/gpio", role=None, headers={"Authorization": f"Bearer {forged}"}), 401)

    assert relays.get("/gpio", role="viewer").status_code == 200
    assert "operator" in _error(relays.post("/gpio/relay1", role="viewer", json={"state": "on"}), 403)
    assert relays.relays()["relay1"] == "off", "a refused switch must not switch"

    r = relays.post("/gpio/relay1", role="operator", json={"state": "on"})
    assert r.status_code == 200 and r.json()["state"] == "on", r.text
    assert relays.get("/gpio/relay1").json()["state"] == "on"
    r = relays.post("/gpio/relay1", role="admin", json={"state": "toggle"})
    assert r.status_code == 200 and r.json()["state"] == "off", r.text
    assert relays.relays()["relay1"] == "off"

    # the same over curl, the way the demo prints it
    out = subprocess.run(["curl", "-s", "-X", "POST", "-H", f"Authorization: Bearer {relays.token('operator')}",
                          "-H", "Content-Type: application/json", "-d", '{"state": "on"}', "-w", "\n%{http_code}",
                          relays.url + "/gpio/relay2"], capture_output=True, text=True, timeout=20)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["state"] == "on", out
    assert relays.post("/gpio/relay2", json={"state": "off"}).status_code == 200


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/gpio/nosuch", None, 404),
    ("POST", "/gpio/nosuch", b'{"state": "on"}', 404),
    ("POST", "/gpio/relay1", b'{"state": "on"', 400),           # bad JSON
    ("POST", "/gpio/relay1", b'["on"]', 400),                   # not an object
    ("POST", "/gpio/relay1", b"", 400),                         # no body
    ("POST", "/gpio/relay1", b'{"state": 1}', 400),             # wrong type
    ("POST", "/gpio/relay1", b'{"state": "dim"}', 400),         # unknown state
    ("POST", "/gpio/relay1", b'{"state": "on", "pulse_ms": "5"}', 400),
    ("POST", "/gpio/relay1", b'{"state": "on", "pulse_ms": -1}', 400),
    ("POST", "/gpio/relay1", b'{"state": "on", "colour": "red"}', 400),
    ("POST", "/gpio/relay1", b'{"state": "on", "x": "' + b"a" * 2000 + b'"}', 413),
    ("GET", "/nowhere", None, 404),
    ("DELETE", "/gpio/relay1", None, 405),
])
def test_bad_input_gets_its_answer_and_nothing_changes(relays, method, path, body, status):
    before = relays.relays()
    with relays.client("operator") as c:
        r = c.request(method, path, content=body, headers={"Content-Type": "application/json"})
    _error(r, status)
    assert relays.relays() == before
    assert relays.get("/health", role=None).status_code == 200


def test_connection_flood_gets_503_then_serves_again(relays):
    idle = []
    try:
        for _ in range(3):  # DeviceWeb.max_connections: silent clients hold every slot
            s = socket.create_connection(("127.0.0.1", relays.child.port), timeout=5)
            s.sendall(b"GET /gpio HTTP/1.1\r\n")  # an unfinished request keeps the connection busy
            idle.append(s)
        wait_until(lambda: relays.get("/health", role=None).status_code == 503, 10, "503 at the connection cap")
        r = relays.get("/health", role=None)
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: relays.get("/gpio").status_code == 200, 15, "the device to serve again")


def test_request_flood_gets_429_then_serves_again(relays):
    relays.configure({"api": {"rate_per_s": 0.5, "burst": 3}})
    try:
        codes = []
        retry_after = set()
        with relays.client("viewer") as c:
            for _ in range(12):
                r = c.get("/gpio")
                codes.append(r.status_code)
                if r.status_code == 429:
                    retry_after.add(r.headers.get("Retry-After"))
                    assert "rate" in r.json()["error"]
        assert set(codes) <= {200, 429} and codes.count(429) >= 6, codes
        assert retry_after and all(v and int(v) >= 1 for v in retry_after), retry_after
    finally:
        relays.configure({"api": {"rate_per_s": 500, "burst": 500}}, timeout=60)
    assert relays.get("/gpio").status_code == 200


def test_desired_state_switches_the_relay_and_is_reported_back(relays, cp):
    assert relays.relays()["relay2"] == "off"
    cp.desire(relays.id, {"relay2": "on"})
    wait_until(lambda: relays.relays()["relay2"] == "on", 30, "the device to apply desired relay2=on")

    def reported():
        st = cp.shadow(relays.id)["state"]
        return st["reported"].get("relay2") == "on" and "relay2" not in (st.get("delta") or {})
    wait_until(reported, 30, "relay2=on reported to the control plane")

    # a local switch is reported too
    assert relays.post("/gpio/relay1", json={"state": "on"}).status_code == 200
    wait_until(lambda: cp.shadow(relays.id)["state"]["reported"].get("relay1") == "on", 30, "relay1=on reported")

    cp.desire(relays.id, {"relay2": "off"})
    wait_until(lambda: relays.relays()["relay2"] == "off", 30, "the device to apply desired relay2=off")
    cp.desire(relays.id, {"relay2": None})
    assert relays.post("/gpio/relay1", json={"state": "off"}).status_code == 200


def test_interlock_never_violated_under_concurrent_requests(relays):
    gpio = relays.get("/gpio").json()["relays"]
    assert {r["name"]: r["interlock"] for r in gpio if r["name"].startswith("pump")} == {"pump_a": "pump",
                                                                                         "pump_b": "pump"}
    observed = []
    answers = []
    errors = []
    stop = threading.Event()

    seen_codes = []
    deadline = time.monotonic() + 30

    def switcher(order):
        # At least 12 switches each, and on until the watcher has seen the relays 3 times mid-switching (on a loaded
        # machine its thread can get no turn, or only 503s at the connection cap, during 12 quick switches).
        with relays.client("operator") as c:
            i = 0
            while i < 12 or (len(observed) < 3 and time.monotonic() < deadline):
                name = order[i % 2]
                i += 1
                r = c.post(f"/gpio/{name}", json={"state": "on"})
                answers.append(r.status_code)
                if r.status_code not in (200, 503):
                    errors.append((name, r.status_code, r.text))

    def watcher():
        with relays.client("viewer") as c:
            while not stop.is_set():
                r = c.get("/gpio")
                seen_codes.append(r.status_code)
                if r.status_code == 200:
                    observed.append({x["name"]: x["state"] for x in r.json()["relays"]})

    threads = [threading.Thread(target=switcher, args=(o,)) for o in (("pump_a", "pump_b"), ("pump_b", "pump_a"))]
    w = threading.Thread(target=watcher)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors, errors
    assert answers.count(200) >= 6, answers
    assert len(observed) >= 3, f"the watcher must have seen the relays while they switched: {seen_codes}"
    observed.append(relays.relays())
    both = [o for o in observed if o["pump_a"] == "on" and o["pump_b"] == "on"]
    assert not both, f"interlock violated in {len(both)} of {len(observed)} observations"
    final = relays.relays()
    assert sorted((final["pump_a"], final["pump_b"])) == ["off", "on"], final

    # the pin transition log of the simulated board: not even a 0 ms overlap (what no HTTP observer could see)
    pins = {"pump_a": 18, "pump_b": 19}
    want = {pins[n]: int(final[n] == "on") for n in pins}

    def settled():
        log = relays.pinlog()
        last = {}
        for _, pin, level in log["events"]:
            last[pin] = level
        return log if all(last.get(p) == lv for p, lv in want.items()) else None
    log = wait_until(settled, 10, "the pin log to show the final relay states")
    assert log["dropped"] == 0, "the log must be complete to prove anything"
    level = {}
    switches = 0
    for ms, pin, lv in log["events"]:
        if pin in want:
            switches += level.get(pin) is not None and level.get(pin) != lv
            level[pin] = lv
            assert not (level.get(18) == 1 and level.get(19) == 1), f"both pumps on at {ms} ms: {log['events']}"
    assert switches >= 4, f"the pumps must have switched back and forth: {log['events']}"
