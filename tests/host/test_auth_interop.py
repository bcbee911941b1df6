"""iotlib.auth against CPython's own implementations: hmac (RFC 4231 + random inputs) and PyJWT, both ways."""
import hashlib
import hmac
import json
import os
import sys
import time

import jwt
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "firmware"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "firmware"))

from iotlib import auth  # noqa: E402
from test_auth import RFC4231  # noqa: E402

KEY = "device-key-" + "ab" * 32


@pytest.mark.parametrize("key,msg,want", RFC4231)
def test_rfc4231_matches_cpython_hmac(key, msg, want):
    assert hmac.new(key, msg, hashlib.sha256).hexdigest() == want
    assert auth.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_random_keys_and_messages_match_cpython_hmac():
    for klen in (0, 1, 31, 63, 64, 65, 127, 128, 200):
        for mlen in (0, 1, 55, 64, 65, 300):
            k, m = os.urandom(klen), os.urandom(mlen)
            assert auth.hmac_sha256(k, m) == hmac.new(k, m, hashlib.sha256).digest(), (klen, mlen)


def test_compare_digest_agrees_with_hmac():
    for a, b in ((b"x", b"x"), (b"x", b"y"), (b"", b""), (b"ab", b"abc")):
        assert auth.compare_digest(a, b) == hmac.compare_digest(a, b)


def test_pyjwt_token_verifies_on_device():
    now = int(time.time())
    claims = {"sub": "ann", "aud": "relay-1", "role": "operator", "iat": now, "exp": now + 300, "nbf": now - 5}
    tok = jwt.encode(claims, KEY, algorithm="HS256")
    assert auth.jwt_decode(tok, KEY, now=now, audience="relay-1") == claims
    m = auth.AuthManager("relay-1", KEY, now_s=lambda: now)
    assert m.verify("Bearer " + tok)["role"] == "operator"
    # a unicode claim survives both encoders
    tok = jwt.encode({"name": "Zoë ☃", "role": "viewer"}, KEY, algorithm="HS256")
    assert auth.jwt_decode(tok, KEY, now=now)["name"] == "Zoë ☃"


def test_device_token_verifies_with_pyjwt():
    now = int(time.time())
    tok = auth.jwt_encode({"sub": "relay-1", "role": "device", "exp": now + 60, "n": [1, {"x": None}]}, KEY)
    got = jwt.decode(tok, KEY, algorithms=["HS256"])
    assert got == {"sub": "relay-1", "role": "device", "exp": now + 60, "n": [1, {"x": None}]}
    assert jwt.get_unverified_header(tok) == {"alg": "HS256", "typ": "JWT"}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, KEY + "x", algorithms=["HS256"])


def test_pyjwt_rejections_match():
    now = int(time.time())
    expired = jwt.encode({"exp": now - 3600}, KEY, algorithm="HS256")
    with pytest.raises(auth.AuthError, match="expired"):
        auth.jwt_decode(expired, KEY, now=now)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, KEY, algorithms=["HS256"])
    unsigned = jwt.encode({"role": "admin"}, None, algorithm="none")
    with pytest.raises(auth.AuthError, match="alg"):
        auth.jwt_decode(unsigned, KEY, now=now)
    hs512 = jwt.encode({"role": "admin"}, KEY, algorithm="HS512")
    with pytest.raises(auth.AuthError, match="alg"):
        auth.jwt_decode(hs512, KEY, now=now)
    other = jwt.encode({"role": "admin"}, "other-key-" + "cd" * 32, algorithm="HS256")
    with pytest.raises(auth.AuthError, match="signature"):
        auth.jwt_decode(other, KEY, now=now)


def test_registration_signature_matches_server_formula():
    m = auth.AuthManager("relay-1", KEY)
    nonce = os.urandom(16).hex()
    want = hmac.new(KEY.encode(), (nonce + "|relay-1").encode(), hashlib.sha256).hexdigest()
    assert m.signature(nonce) == want


def test_hash_token_is_sha256_hex():
    assert auth.hash_token("tok") == hashlib.sha256(b"tok").hexdigest()
    assert json.dumps(auth.hash_token("tok"))  # storable in JSON config
