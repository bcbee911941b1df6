import binascii
import json

import fwtest
import peers
from iotlib import auth
from iotlib.auth import AuthError, AuthManager, RateLimiter
from iotlib.http import HTTPClient, HTTPError

# RFC 4231 test cases 1-4, 6, 7 (6 and 7: keys longer than the 64-byte block) and 5 (truncated to 128 bits)
RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data. The key "
                    b"needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]
KEY = "9f" * 32
NOW = 1795000000


def hx(b):
    return binascii.hexlify(b).decode()


def test_hmac_rfc4231_vectors():
    for key, msg, want in RFC4231:
        assert hx(auth.hmac_sha256(key, msg)) == want
    # test case 5: only the first 128 bits are specified
    assert hx(auth.hmac_sha256(b"\x0c" * 20, b"Test With Truncation"))[:32] == "a3b6167473100ee06e0c796c2955552b"


def test_hmac_accepts_str_and_exact_block_key():
    assert auth.hmac_sha256("Jefe", "what do ya want for nothing?") == auth.hmac_sha256(b"Jefe",
                                                                                        b"what do ya want for nothing?")
    k64 = b"k" * 64  # exactly the block size: used as is, not hashed
    assert auth.hmac_sha256(k64, b"m") != auth.hmac_sha256(k64 + b"x", b"m")


def test_compare_digest():
    assert auth.compare_digest(b"abc", b"abc")
    assert not auth.compare_digest(b"abc", b"abd")
    assert not auth.compare_digest(b"abc", b"abcd")
    assert not auth.compare_digest(b"", b"a")


def test_b64url_roundtrip_and_strictness():
    for n in range(8):
        data = bytes(range(250, 250 - n, -1))
        enc = auth.b64url_encode(data)
        assert "=" not in enc and "+" not in enc and "/" not in enc
        assert auth.b64url_decode(enc) == data
    for bad in ("a", "ab!d", "ab+d", "ab/d", "abc="):
        fwtest.raises(AuthError, auth.b64url_decode, bad)


def test_jwt_roundtrip_and_claims():
    tok = auth.jwt_encode({"sub": "ann", "role": "operator", "exp": NOW + 60}, KEY)
    assert tok.count(".") == 2
    c = auth.jwt_decode(tok, KEY, now=NOW)
    assert c == {"sub": "ann", "role": "operator", "exp": NOW + 60}
    head = json.loads(auth.b64url_decode(tok.split(".")[0]))
    assert head == {"alg": "HS256", "typ": "JWT"}


def test_jwt_exp_nbf_with_leeway():
    tok = auth.jwt_encode({"exp": NOW, "nbf": NOW - 100}, KEY)
    auth.jwt_decode(tok, KEY, now=NOW + auth.JWT_LEEWAY_S)  # inside the leeway
    e = fwtest.raises(AuthError, auth.jwt_decode, tok, KEY, now=NOW + auth.JWT_LEEWAY_S + 1)
    assert "expired" in str(e)
    tok = auth.jwt_encode({"nbf": NOW + 100}, KEY)
    e = fwtest.raises(AuthError, auth.jwt_decode, tok, KEY, now=NOW)
    assert "not yet valid" in str(e)
    auth.jwt_decode(tok, KEY, now=NOW + 100 - auth.JWT_LEEWAY_S)
    e = fwtest.raises(AuthError, auth.jwt_decode, auth.jwt_encode({"exp": "soon"}, KEY), KEY, now=NOW)
    assert "exp" in str(e)


def test_jwt_rejects_tampering_wrong_key_and_alg_none():
    tok = auth.jwt_encode({"role": "viewer"}, KEY)
    h, p, s = tok.split(".")
    forged = auth.b64url_encode(b'{"role":"admin"}')
    assert "bad signature" in str(fwtest.raises(AuthError, auth.jwt_decode, h + "." + forged + "." + s, KEY, now=NOW))
    assert "bad signature" in str(fwtest.raises(AuthError, auth.jwt_decode, tok, "other", now=NOW))
    none_head = auth.b64url_encode(b'{"alg":"none","typ":"JWT"}')
    for t in (none_head + "." + p + ".", none_head + "." + p + "." + s):
        assert "alg" in str(fwtest.raises(AuthError, auth.jwt_decode, t, KEY, now=NOW))
    rs = auth.b64url_encode(b'{"alg":"RS256"}')
    assert "alg" in str(fwtest.raises(AuthError, auth.jwt_decode, rs + "." + p + "." + s, KEY, now=NOW))


def test_jwt_malformed_tokens_give_reasons():
    cases = [
        ("", "3 parts"), ("a.b", "3 parts"), ("a.b.c.d", "3 parts"), ("!!.b.c", "base64url"),
        (auth.b64url_encode(b"not json") + ".e30.", "header"),
        (auth.b64url_encode(b"[1]") + ".e30.", "header"),
        ("x" * 3000, "too long"),
    ]
    for tok, why in cases:
        e = fwtest.raises(AuthError, auth.jwt_decode, tok, KEY, now=NOW)
        assert why in str(e), (tok[:20], str(e))
    assert "not a string" in str(fwtest.raises(AuthError, auth.jwt_decode, None, KEY))
    # a correctly signed payload that is not an object
    h = auth.b64url_encode(b'{"alg":"HS256"}')
    p = auth.b64url_encode(b"[1,2]")
    t = h + "." + p + "." + auth.b64url_encode(auth.hmac_sha256(KEY, h + "." + p))
    assert "payload" in str(fwtest.raises(AuthError, auth.jwt_decode, t, KEY, now=NOW))


def test_jwt_audience():
    tok = auth.jwt_encode({"aud": "relay-1", "role": "admin"}, KEY)
    assert auth.jwt_decode(tok, KEY, now=NOW, audience="relay-1")["role"] == "admin"
    assert "audience" in str(fwtest.raises(AuthError, auth.jwt_decode, tok, KEY, now=NOW, audience="relay-2"))
    tok = auth.jwt_encode({"aud": ["a", "relay-1"]}, KEY)
    auth.jwt_decode(tok, KEY, now=NOW, audience="relay-1")


def test_roles_order():
    assert auth.role_at_least("admin", "viewer") and auth.role_at_least("operator", "operator")
    assert not auth.role_at_least("viewer", "operator") and not auth.role_at_least("operator", "admin")
    assert not auth.role_at_least("root", "viewer") and not auth.role_at_least("device", "viewer")
    assert not auth.role_at_least("admin", "superuser")


def test_rate_limiter_bucket_refill_and_retry_after():
    t = [1000]
    rl = RateLimiter(2, 3, clock=lambda: t[0])
    assert [rl.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    ok, retry = rl.allow("a")
    assert not ok and retry == 1
    assert rl.allow("b") == (True, 0)  # other clients have their own bucket
    t[0] += 500  # 2/s → one token back
    assert rl.allow("a") == (True, 0)
    assert not rl.allow("a")[0]
    t[0] += 60000  # refills to burst, not beyond
    assert [rl.allow("a")[0] for _ in range(4)] == [True, True, True, False]
    slow = RateLimiter(0.1, 1, clock=lambda: t[0])
    slow.allow("x")
    assert slow.allow("x") == (False, 10)
    fwtest.raises(ValueError, RateLimiter, 0, 1)


def test_rate_limiter_table_is_bounded_and_evicts_least_recent():
    t = [0]
    rl = RateLimiter(1, 1, max_clients=3, clock=lambda: t[0])
    for c in ("a", "b", "c"):
        t[0] += 10
        rl.allow(c)
    t[0] += 10
    rl.allow("a")  # a is now the most recent; b the least
    t[0] += 10
    rl.allow("d")
    assert len(rl) == 3
    assert rl.allow("a")[0] is False  # a kept its empty bucket
    assert rl.allow("b")[0] is True  # b was forgotten, so it starts full


def test_static_tokens_stored_as_hashes():
    h = auth.hash_token("s3cret-token")
    assert len(h) == 64 and h != "s3cret-token"
    assert h == auth.hash_token(b"s3cret-token")
    m = AuthManager("relay-1", KEY)
    assert m.verify("Bearer s3cret-token", {h: "operator"})["role"] == "operator"
    assert m.verify("s3cret-token", [{"sha256": h.upper(), "role": "admin", "name": "ci"}]) == {
        "sub": "ci", "role": "admin", "static": True}
    assert m.verify("s3cret-token", [h])["role"] == "viewer"  # bare hash: least privilege
    assert "unknown token" in str(fwtest.raises(AuthError, m.verify, "wrong", [h]))
    assert "role" in str(fwtest.raises(AuthError, m.verify, "s3cret-token", {h: "root"}))
    m.static_tokens = {h: "viewer"}  # hot-reloaded from config
    assert m.verify("Bearer s3cret-token")["role"] == "viewer"
    m.static_tokens = ()
    fwtest.raises(AuthError, m.verify, "Bearer s3cret-token")


def test_verify_device_scoped_jwt():
    m = AuthManager("relay-1", KEY, now_s=lambda: NOW)
    tok = auth.jwt_encode({"sub": "ann", "aud": "relay-1", "role": "operator", "exp": NOW + 600}, KEY)
    assert m.verify("Bearer " + tok)["sub"] == "ann"
    assert m.verify("bearer " + tok)["role"] == "operator"
    other = auth.jwt_encode({"aud": "relay-2", "role": "admin", "exp": NOW + 600}, KEY)
    assert "audience" in str(fwtest.raises(AuthError, m.verify, other))
    wrong_key = auth.jwt_encode({"aud": "relay-1", "role": "admin"}, "another-device-key")
    assert "signature" in str(fwtest.raises(AuthError, m.verify, wrong_key))
    no_role = auth.jwt_encode({"aud": "relay-1", "role": "device", "exp": NOW + 600}, KEY)
    assert "role" in str(fwtest.raises(AuthError, m.verify, no_role))
    old = auth.jwt_encode({"role": "admin", "exp": NOW - 3600}, KEY)
    assert "expired" in str(fwtest.raises(AuthError, m.verify, old))
    forever = auth.jwt_encode({"aud": "relay-1", "role": "admin"}, KEY)  # no exp: it would never expire
    assert "no exp" in str(fwtest.raises(AuthError, m.verify, "Bearer " + forever))
    assert auth.jwt_decode(forever, KEY, now=NOW)["role"] == "admin"  # the codec itself leaves exp optional
    for bad in (None, "", "Bearer ", "Bearer  "):
        assert "missing" in str(fwtest.raises(AuthError, m.verify, bad))
    assert "AuthManager" in repr(m) and KEY not in repr(m)


# --- the registration client against a ServiceDiscovery peer -----------------------------------------------------

class FakeSD:
    """A ServiceDiscovery per docs/protocol.md §2: single-use nonces, HMAC check, token refresh."""

    def __init__(self, key=KEY, expires_in=3600):
        self.key = key
        self.expires_in = expires_in
        self.nonces = {}
        self.n = 0
        self.refuse_refresh = False
        self.base = None

    def __call__(self, method, path, headers, doc):
        if path.endswith("/challenge"):
            self.n += 1
            nonce = "%032x" % self.n
            self.nonces[nonce] = doc["device_id"]
            return 200, {"nonce": nonce, "expires_in": 60}
        if path.endswith("/register"):
            if self.nonces.pop(doc.get("nonce"), None) != doc.get("device_id"):
                return 401, {"error": "unknown or expired nonce"}
            want = hx(auth.hmac_sha256(self.key, doc["nonce"] + "|" + doc["device_id"]))
            if doc.get("signature") != want:
                return 401, {"error": "bad signature"}
            return 200, {"token": "h.p%d.s" % self.n, "token_expires_in": self.expires_in, "namespace": "lab",
                         "device_id": doc["device_id"],
                         "services": {"state": self.base + "/state", "refresh": self.base + "/api/devices/refresh"},
                         "intervals": {"heartbeat": 10}, "server_time": 1795000000000}
        if path.endswith("/refresh"):
            if self.refuse_refresh or not headers.get("authorization", "").startswith("Bearer h."):
                return 401, {"error": "token expired"}
            self.n += 1
            return 200, {"token": "h.r%d.s" % self.n, "token_expires_in": self.expires_in}
        return 404, {"error": "not found"}


async def _sd(sd):
    app = peers.App(sd)
    sd.base = await app.start()
    return app


def test_register_success_and_fields():
    async def go():
        sd = FakeSD()
        app = await _sd(sd)
        try:
            m = AuthManager("relay-1", KEY, sd_url=sd.base + "/api/devices")
            d = await m.register(HTTPClient(timeout_ms=1000), info={"device_type": "relays", "firmware": "0.1.0"})
        finally:
            await app.stop()
        assert m.token == "h.p1.s" and d["namespace"] == "lab"
        assert m.namespace == "lab" and m.services["state"].endswith("/state")
        assert m.intervals == {"heartbeat": 10} and m.server_time == 1795000000000
        (m1, p1, _, b1), (m2, p2, _, b2) = app.log
        assert p1 == "/api/devices/challenge" and b1 == {"device_id": "relay-1"}
        assert p2 == "/api/devices/register" and b2["device_type"] == "relays" and b2["firmware"] == "0.1.0"
        assert b2["signature"] == hx(auth.hmac_sha256(KEY, b2["nonce"] + "|relay-1"))
        assert KEY not in json.dumps(b2)  # the key never crosses the wire
        assert AuthManager("d", KEY, namespace="lab").namespace == "lab"
    fwtest.run(go())


def test_register_refused_with_wrong_key_and_malformed_answers():
    async def go():
        sd = FakeSD()
        app = await _sd(sd)
        http = HTTPClient(timeout_ms=1000)
        try:
            m = AuthManager("relay-1", "not-the-key", sd_url=sd.base + "/api/devices")
            e = None
            try:
                await m.register(http)
            except AuthError as x:
                e = x
            assert e is not None and "401" in str(e) and "bad signature" in str(e)
            assert m.token is None
        finally:
            await app.stop()

        for answer in ({"nonce": ""}, {"nope": 1}, [1]):
            bad = peers.App(lambda *a: (200, answer))
            base = await bad.start()
            try:
                m = AuthManager("relay-1", KEY, sd_url=base)
                try:
                    await m.register(http)
                    assert False, "accepted %r" % (answer,)
                except AuthError as x:
                    assert "challenge" in str(x)
            finally:
                await bad.stop()
        # a register answer without a token
        seq = [(200, {"nonce": "ab"}), (200, {"services": {}})]
        bad = peers.App(lambda *a: seq.pop(0))
        base = await bad.start()
        try:
            try:
                await AuthManager("relay-1", KEY, sd_url=base).register(http)
                assert False
            except AuthError as x:
                assert "lacks token" in str(x)
        finally:
            await bad.stop()
        # no server at all: a transport error, not an AuthError
        try:
            await AuthManager("relay-1", KEY, sd_url=base).register(http)
            assert False
        except HTTPError:
            pass
        fwtest.raises(ValueError, AuthManager, "", KEY)
    fwtest.run(go())


def test_ensure_token_refreshes_near_expiry_and_reregisters_on_401():
    async def go():
        t = [0]
        sd = FakeSD(expires_in=3600)
        app = await _sd(sd)
        http = HTTPClient(timeout_ms=1000)
        try:
            m = AuthManager("relay-1", KEY, sd_url=sd.base + "/api/devices", namespace="lab", clock=lambda: t[0])
            tok = await m.ensure_token(http)
            assert app.log[0][3] == {"device_id": "relay-1", "namespace": "lab"}
            assert tok == "h.p1.s" and m.registrations == 1
            t[0] = 3000 * 1000  # 600 s left: more than 10 % (360 s)
            assert await m.ensure_token(http) == tok and len(app.log) == 2
            t[0] = 3300 * 1000  # 300 s left: refresh
            tok2 = await m.ensure_token(http)
            assert tok2.startswith("h.r") and m.refreshes == 1 and m.registrations == 1
            assert app.log[-1][2]["authorization"] == "Bearer " + tok
            assert m.seconds_left() == 3600
            t[0] += 3400 * 1000
            sd.refuse_refresh = True  # refresh answered 401 → register again
            tok3 = await m.ensure_token(http)
            assert tok3.startswith("h.p") and m.registrations == 2
            m.invalidate()  # a service said 401
            await m.ensure_token(http)
            assert m.registrations == 3
            t[0] += 7200 * 1000  # expired outright: straight to register
            await m.ensure_token(http)
            assert m.registrations == 4 and app.log[-1][1].endswith("/register")
        finally:
            await app.stop()
    fwtest.run(go())


def test_refresh_margin_for_short_lifetimes():
    t = [0]
    m = AuthManager("d", KEY, clock=lambda: t[0])
    m._set_token("a.b.c", 100)  # 60 s floor, but never more than half the lifetime
    t[0] = 49000
    assert not m.needs_refresh()
    t[0] = 50000
    assert m.needs_refresh()
    m._set_token("a.b.c", 3600)
    t[0] = 50000 + 3239000
    assert not m.needs_refresh()
    t[0] = 50000 + 3240000
    assert m.needs_refresh()


def test_lazy_exports():
    import iotlib
    from iotlib import state, timesync
    assert iotlib.AuthManager is AuthManager and iotlib.AuthError is AuthError and iotlib.RateLimiter is RateLimiter
    assert iotlib.StateError is state.StateError and iotlib.SNTPError is timesync.SNTPError


def test_verified_jwt_cache_keeps_expiry_and_tampering_checks_and_stays_bounded():
    clock = [NOW]
    m = AuthManager("relay-1", KEY, now_s=lambda: clock[0])
    tok = auth.jwt_encode({"sub": "ann", "aud": "relay-1", "role": "operator", "exp": NOW + 60}, KEY)
    assert m.verify("Bearer " + tok)["sub"] == "ann"
    assert m.verify("Bearer " + tok)["role"] == "operator"  # the remembered answer is the same
    head, body, sig = tok.split(".")
    forged = head + "." + auth.b64url_encode(b'{"sub":"ann","aud":"relay-1","role":"admin"}') + "." + sig
    assert "signature" in str(fwtest.raises(AuthError, m.verify, forged))  # a cached signature proves nothing
    clock[0] = NOW + 60 + m.leeway_s + 1
    assert "expired" in str(fwtest.raises(AuthError, m.verify, tok))  # remembered tokens still expire
    assert "expired" in str(fwtest.raises(AuthError, m.verify, "Bearer " + tok))  # also under the key it was kept
    clock[0] = NOW
    for i in range(m.verified_cache_size * 3):
        m.verify(auth.jwt_encode({"sub": "u%d" % i, "aud": "relay-1", "role": "viewer", "exp": NOW + 60}, KEY))
    assert len(m._verified) <= m.verified_cache_size
