"""ServiceDiscovery: challenge, registration, nonces, keys, tokens (protocol §2)."""
import concurrent.futures
import time

import jwt
import pytest
import sqlalchemy as sa

from picoiot.server import db as tables, nonces
from picoiot.server.auth import derive_device_key, issue_token

from cptest import metric, sign


def _challenge(server, dev, ns="default"):
    r = server.client.post("/api/devices/challenge", json={"device_id": dev, "namespace": ns})
    assert r.status_code == 200, r.text
    return r.json()["nonce"]


def _register(server, dev, nonce, key, **kw):
    return server.client.post("/api/devices/register", json={
        "device_id": dev, "nonce": nonce, "signature": sign(key, nonce, dev), "device_type": "relays", **kw})


def _key(server, dev, ns="default"):
    return derive_device_key(server.settings.secrets.enrollment_key(ns), dev)


def test_register_returns_token_services_intervals_and_records_the_device(server):
    d = server.register("relay-1", firmware="0.2.0", capabilities=["relays", "rest"], address="http://10.1.1.1:80",
                        reset_cause="watchdog")
    claims = jwt.decode(d.token, server.settings.secrets.signing_key, algorithms=["HS256"])
    assert claims["sub"] == "relay-1" and claims["ns"] == "default" and claims["role"] == "device"
    assert claims["exp"] > claims["iat"]
    assert d.services["config"] == f"{server.url}/api/v1/devices/relay-1/config"
    assert d.services["state"] == f"{server.url}/api/v1/namespaces/default/devices/relay-1/shadows/default"
    assert d.services["heartbeat"].endswith("/api/v1/devices/relay-1/heartbeat")
    assert d.intervals == {"heartbeat": 10, "ttl": 35, "config_poll": 60, "time_sync": 3600}
    rec = server.client.get("/api/v1/namespaces/default/devices/relay-1", headers=server.auth("viewer")).json()
    assert rec["device_type"] == "relays" and rec["firmware"] == "0.2.0"
    assert rec["capabilities"] == ["relays", "rest"] and rec["address"] == "http://10.1.1.1:80"
    assert rec["reset_cause"] == "watchdog" and rec["online"] is True and rec["key_mode"] == "derived"
    assert rec["first_seen"] and rec["last_seen"] >= rec["first_seen"]


def test_public_url_is_used_for_service_urls(server_factory):
    s = server_factory(public_url="https://iot.example.net/")
    d = s.register("relay-2")
    assert d.services["config"] == "https://iot.example.net/api/v1/devices/relay-2/config"


def test_ntp_address_of_a_wildcard_bind_is_the_host_the_device_reached(server_factory):
    s = server_factory(ntp_address="0.0.0.0:12345")
    assert s.register("ntp-1").services["ntp"] == "127.0.0.1:12345"  # not 0.0.0.0: the device would ask itself
    p = server_factory(ntp_address="0.0.0.0:123", public_url="http://cp.example:8080")
    assert p.register("ntp-2").services["ntp"] == "cp.example:123"
    fixed = server_factory(ntp_address="10.0.0.5:123")
    assert fixed.register("ntp-3").services["ntp"] == "10.0.0.5:123"  # a concrete bind address stays


def test_replayed_nonce_is_refused(server):
    nonce = _challenge(server, "relay-1")
    assert _register(server, "relay-1", nonce, _key(server, "relay-1")).status_code == 200
    r = _register(server, "relay-1", nonce, _key(server, "relay-1"))
    assert r.status_code == 401 and r.json()["error"] == "unknown or expired nonce"


def test_bad_signature_is_refused_and_burns_the_nonce(server):
    nonce = _challenge(server, "relay-1")
    r = _register(server, "relay-1", nonce, "0" * 64)
    assert r.status_code == 401 and r.json()["error"] == "bad signature"
    # the nonce is gone even though the attempt failed: no second guess with it
    r = _register(server, "relay-1", nonce, _key(server, "relay-1"))
    assert r.status_code == 401 and r.json()["error"] == "unknown or expired nonce"


def test_nonce_is_bound_to_the_device_id(server):
    nonce = _challenge(server, "relay-1")
    r = _register(server, "relay-2", nonce, _key(server, "relay-2"))
    assert r.status_code == 401
    # answered, if for another device: used up all the same
    assert _register(server, "relay-1", nonce, _key(server, "relay-1")).json()["error"] == "unknown or expired nonce"


def test_expired_nonce_is_refused(server):
    # made as the challenge makes it, by this server's own key, two minutes ago with a 60 s lifetime
    nonce = nonces.issue(server.settings.secrets.signing_key, "default", "relay-1", 60, now_s=time.time() - 120)
    r = _register(server, "relay-1", nonce, _key(server, "relay-1"))
    assert r.status_code == 401 and "expired" in r.json()["error"]


def _nonce_rows(server) -> int:
    return server.sql(lambda c: c.execute(sa.select(sa.func.count()).select_from(tables.nonces)).scalar())


def test_a_challenge_writes_nothing_and_the_answer_records_its_nonce(server):
    nonce = _challenge(server, "relay-1")
    assert len(nonce) == 64 and _nonce_rows(server) == 0  # stateless: no row until it is answered
    assert _register(server, "relay-1", nonce, _key(server, "relay-1")).status_code == 200
    assert _nonce_rows(server) == 1  # used: a replay on any replica finds it


def test_forged_or_altered_nonces_are_refused_and_leave_the_real_one_usable(server):
    nonce = _challenge(server, "relay-1")
    key = _key(server, "relay-1")
    later = f"{int(nonce[:8], 16) + 3600:08x}" + nonce[8:]  # its expiry moved an hour on: the MAC no longer fits
    foreign = nonces.issue("another-server's-key-" + "x" * 20, "default", "relay-1", 60)
    for forged in (later, foreign, nonce[:-1] + ("0" if nonce[-1] != "0" else "1"), nonce.upper(), "0" * 32):
        r = _register(server, "relay-1", forged, key)
        assert r.status_code == 401 and r.json()["error"] == "unknown or expired nonce", forged
    assert _nonce_rows(server) == 0  # never issued, so nothing to use up
    assert _register(server, "relay-1", nonce, key).status_code == 200


def test_the_namespace_is_the_one_the_nonce_was_issued_in(server):
    nonce = _challenge(server, "relay-1", ns="other")
    r = _register(server, "relay-1", nonce, _key(server, "relay-1", ns="other"))  # no namespace, as the firmware
    assert r.status_code == 200, r.text
    assert r.json()["namespace"] == "other"


def test_key_of_another_namespace_does_not_register(server):
    nonce = _challenge(server, "relay-1", ns="default")
    r = _register(server, "relay-1", nonce, _key(server, "relay-1", ns="other"))
    assert r.status_code == 401


def test_namespace_in_register_must_match_the_challenge(server):
    nonce = _challenge(server, "relay-1", ns="default")
    r = _register(server, "relay-1", nonce, _key(server, "relay-1"), namespace="other")
    assert r.status_code == 401


def test_unknown_namespace_is_404(server):
    r = server.client.post("/api/devices/challenge", json={"device_id": "relay-1", "namespace": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "unknown namespace"


def test_individually_registered_key(server):
    r = server.client.post("/api/v1/namespaces/default/devices", headers=server.auth("admin"),
                           json={"device_id": "solo", "device_type": "sensors", "key_mode": "individual"})
    assert r.status_code == 201, r.text
    key = r.json()["device_key"]
    assert key != _key(server, "solo")
    # the derived key no longer works for this device; its own key does
    assert _register(server, "solo", _challenge(server, "solo"), _key(server, "solo")).status_code == 401
    d = server.register("solo", device_type=None, key=key)
    assert d.intervals["ttl"] == 35
    rec = server.client.get("/api/v1/namespaces/default/devices/solo", headers=server.auth("viewer")).json()
    assert rec["key_mode"] == "individual" and rec["device_type"] == "sensors"


def test_unknown_device_type_is_422(server):
    r = _register(server, "relay-1", _challenge(server, "relay-1"), _key(server, "relay-1"), device_type="toaster")
    assert r.status_code == 422 and r.json()["detail"]["path"] == "device_type"


def test_malformed_bodies(server):
    c = server.client
    r = c.post("/api/devices/challenge", content=b'{"device_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed JSON"
    r = c.post("/api/devices/challenge", json={"device_id": "bad id with spaces"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "device_id"
    r = c.post("/api/devices/register", json={"device_id": "relay-1", "nonce": "x", "signature": "nothex"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "signature"
    r = c.post("/api/devices/challenge", json=["not", "an", "object"])
    assert r.status_code == 422 and "error" in r.json()


def test_refresh(server):
    d = server.register("relay-1")
    r = server.client.post("/api/devices/refresh", headers=d.headers)
    assert r.status_code == 200
    new = r.json()["token"]
    assert jwt.decode(new, server.settings.secrets.signing_key, algorithms=["HS256"])["sub"] == "relay-1"
    # operators cannot mint device tokens this way
    assert server.client.post("/api/devices/refresh", headers=server.auth("admin")).status_code == 403
    # an expired device token cannot be refreshed: the device registers again
    old = issue_token(server.settings.secrets.signing_key, "relay-1", "default", "device", -10)
    r = server.client.post("/api/devices/refresh", headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 401 and r.json()["error"] == "token expired"


def test_tokens_signed_with_another_key_or_garbage_are_401(server):
    forged = issue_token("not-the-key-" + "x" * 32, "relay-1", "default", "device", 300)
    for header in (f"Bearer {forged}", "Bearer garbage", "Basic abc", ""):
        r = server.client.post("/api/v1/devices/relay-1/heartbeat", json={"seq": 1},
                               headers={"Authorization": header} if header else {})
        assert r.status_code == 401, header
        assert r.json()["error"] in ("invalid token", "missing bearer token")


def test_reregistration_keeps_first_seen_and_updates_firmware(server):
    server.register("relay-1", firmware="0.1.0")
    first = server.client.get("/api/v1/namespaces/default/devices/relay-1", headers=server.auth()).json()
    server.register("relay-1", firmware="0.2.0")
    again = server.client.get("/api/v1/namespaces/default/devices/relay-1", headers=server.auth()).json()
    assert again["first_seen"] == first["first_seen"] and again["firmware"] == "0.2.0"
    assert again["config_version"] == first["config_version"]  # same config: no new version
    d = tables.devices
    rows = server.sql(lambda c: c.execute(sa.select(sa.func.count()).select_from(d)).scalar())
    assert rows == 1


def test_token_cache_still_enforces_expiry(server):
    from picoiot.server.auth import Principal
    d = server.register("relay-1")
    assert server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1}).status_code == 200
    cache = server.cp.tokens
    assert d.token in cache._seen  # verified once, then served from the cache
    cache._seen[d.token] = Principal(sub="relay-1", ns="default", role="device", exp=1)  # as if time had passed
    r = server.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 2})
    assert r.status_code == 401 and r.json()["error"] == "token expired"
    assert d.token not in cache._seen


@pytest.mark.postgres
def test_a_nonce_is_used_once_across_servers_even_answered_at_both_at_once(pg_server_factory):
    a, b = pg_server_factory(), pg_server_factory()  # one database, one set of secrets, two processes' worth of state
    key = _key(a, "relay-1")
    nonce = _challenge(a, "relay-1")  # issued by A, answered at B: nothing of it was stored at A
    assert _register(b, "relay-1", nonce, key).status_code == 200
    r = _register(a, "relay-1", nonce, key)
    assert r.status_code == 401 and r.json()["error"] == "unknown or expired nonce"
    nonce = _challenge(b, "relay-1")  # a wrong answer at A uses it up for B too
    assert _register(a, "relay-1", nonce, "0" * 64).json()["error"] == "bad signature"
    assert _register(b, "relay-1", nonce, key).json()["error"] == "unknown or expired nonce"
    for _ in range(5):  # the same right answer sent to both at once: exactly one registers
        nonce = _challenge(a, "relay-1")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = sorted(pool.map(lambda s: _register(s, "relay-1", nonce, key).status_code, (a, b)))
        assert codes == [200, 401]


CHALLENGE, REGISTER = "/api/devices/challenge", "/api/devices/register"


def _by_path(c, route: str) -> tuple[float, float]:
    return tuple(metric(c, "picoiot_fast_path_requests_total", f'outcome="{o}",route="{route}"')
                 for o in ("served", "fallback"))


def _fast_and_slow(c, route: str, make) -> tuple:
    """The same request (`make()` builds its body) through the fast path, then through the FastAPI route (a query
    string, which the route ignores, sends it there): the same status and headers."""
    served, fell = _by_path(c, route)
    fast, slow = c.post(route, json=make()), c.post(route, params={"via": "app"}, json=make())
    assert _by_path(c, route) == (served + 1, fell + 1)
    assert fast.status_code == slow.status_code and _head(fast) == _head(slow), (fast.text, slow.text)
    return fast, slow


def _head(r) -> dict:
    return {k: v for k, v in r.headers.items() if k not in ("date", "server")}


def test_the_challenge_fast_path_answers_as_the_route(server_factory):
    s = server_factory(challenges_per_address_burst=4, challenges_per_address_per_s=0.001)
    c = s.client

    def both(doc):
        return _fast_and_slow(c, CHALLENGE, lambda: doc)

    fast, slow = both({"device_id": "relay-1"})
    assert fast.status_code == 200 and fast.json()["expires_in"] == slow.json()["expires_in"] == 60
    for r in (fast, slow):  # either nonce registers
        assert _register(s, "relay-1", r.json()["nonce"], _key(s, "relay-1")).status_code == 200
    fast, slow = both({"device_id": "relay-1", "namespace": "nope"})
    assert fast.status_code == 404 and fast.content == slow.content
    fast, slow = both({"device_id": "relay-1"})  # the address's burst of 4 is spent
    assert fast.status_code == 429 and fast.json()["error"] == slow.json()["error"]
    assert fast.headers["retry-after"] == slow.headers["retry-after"]
    served, fell = _by_path(c, CHALLENGE)  # what does not validate is the route's to answer
    assert c.post(CHALLENGE, json={"device_id": "bad id"}).status_code == 422
    assert c.post(CHALLENGE, content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert _by_path(c, CHALLENGE) == (served, fell + 2)


def test_the_register_fast_path_answers_as_the_route(server):
    c, key = server.client, _key(server, "relay-1")

    def answer(signed_with=key, **kw):
        def make():
            nonce = _challenge(server, "relay-1")
            return {"device_id": "relay-1", "nonce": nonce, "signature": sign(signed_with, nonce, "relay-1"),
                    "device_type": "relays", **kw}
        return make

    fast, slow = _fast_and_slow(c, REGISTER, answer(firmware="0.3.0"))
    assert fast.status_code == 200
    assert {**fast.json(), "token": "", "server_time": 0} == {**slow.json(), "token": "", "server_time": 0}
    d = fast.json()
    r = c.post(d["services"]["heartbeat"], headers={"Authorization": f"Bearer {d['token']}"}, json={"seq": 1})
    assert r.status_code == 200, r.text
    for make, status in ((answer("0" * 64), 401), (answer(device_type="toaster"), 422),
                         (lambda: {"device_id": "relay-1", "nonce": "0" * 64, "signature": "0" * 64}, 401)):
        fast, slow = _fast_and_slow(c, REGISTER, make)
        assert fast.status_code == status and fast.content == slow.content
    served, fell = _by_path(c, REGISTER)  # what does not validate is the route's to answer
    assert c.post(REGISTER, json={"device_id": "relay-1", "nonce": "x", "signature": "nothex"}).status_code == 422
    assert _by_path(c, REGISTER) == (served, fell + 1)
