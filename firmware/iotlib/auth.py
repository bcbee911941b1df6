# Device-side authentication: HMAC-SHA256 on hashlib (MicroPython has no hmac module), JWT HS256, roles, a per-client
# token bucket, static API tokens kept only as SHA-256 hashes, and the challenge-response registration client
# (docs/protocol.md §2) with token refresh.
import binascii
import hashlib
import json

from iotlib.compat import const, ticks_ms, ticks_diff, epoch_ms

_BLOCK = const(64)  # SHA-256 block size (RFC 2104's B)
_MIN_REFRESH_S = const(60)

ROLES = ("viewer", "operator", "admin")


class AuthError(Exception):
    """A token, signature or registration answer was refused; str(e) says why (never contains the secret)."""


def _b(x):
    return x.encode() if isinstance(x, str) else bytes(x)


def _log():
    try:
        from iotlib.log import get
    except ImportError:
        return None
    return get("auth")


def _warn(msg, **fields):
    lg = _log()
    if lg is not None:
        lg.warning(msg, **fields)


def hmac_sha256(key, msg):
    """RFC 2104 HMAC with SHA-256 → 32 raw bytes. key and msg: bytes or str (UTF-8)."""
    key = _b(key)
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + b"\x00" * (_BLOCK - len(key))
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key))
    inner.update(_b(msg))
    outer = hashlib.sha256(bytes(k ^ 0x5C for k in key))
    outer.update(inner.digest())
    return outer.digest()


def hexlify(b):
    return binascii.hexlify(b).decode()


def compare_digest(a, b):
    """Constant-time equality of two byte strings (or str), so a mismatch position does not leak through timing."""
    a = _b(a)
    b = _b(b)
    diff = len(a) ^ len(b)
    if len(a) != len(b):
        b = a  # still walk the same number of bytes
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


# --- base64url without padding (RFC 7515 §2) ---------------------------------------------------------------------

_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64url_encode(data):
    s = binascii.b2a_base64(_b(data)).strip().rstrip(b"=")
    return s.replace(b"+", b"-").replace(b"/", b"_").decode()


def b64url_decode(s):
    s = _b(s)
    if len(s) % 4 == 1:
        raise AuthError("bad base64url length")
    for c in s:
        if c not in _B64URL:  # MicroPython's a2b_base64 silently skips junk; be strict ourselves
            raise AuthError("bad base64url character")
    s = s.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(s) % 4)
    try:
        return binascii.a2b_base64(s)
    except ValueError:
        raise AuthError("bad base64url")


def _dumps(obj):
    try:
        return json.dumps(obj, separators=(",", ":"))
    except TypeError:  # pragma: no cover - ports without separators
        return json.dumps(obj)


# --- JWT HS256 ---------------------------------------------------------------------------------------------------

#: seconds of clock skew tolerated on exp/nbf (device clocks are SNTP-synced, not perfect)
JWT_LEEWAY_S = 30
#: longest token accepted; longer input is refused before any decoding work
MAX_TOKEN_LEN = 2048


def jwt_encode(claims, key):
    """A compact JWS (HS256) of the claims dict, signed with key."""
    head = b64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = b64url_encode(_dumps(claims))
    signing_input = head + "." + body
    return signing_input + "." + b64url_encode(hmac_sha256(key, signing_input))


def _now_s():
    return epoch_ms() // 1000


def jwt_decode(token, key, now=None, leeway=JWT_LEEWAY_S, audience=None, require_exp=False):
    """Verify an HS256 token and return its claims; raise AuthError with the reason otherwise.

    now: epoch seconds (default: the local clock). audience: if given, an `aud` claim must name it. require_exp: a
    token without `exp` is refused (it would never expire).
    """
    if not isinstance(token, str):
        raise AuthError("token is not a string")
    if len(token) > MAX_TOKEN_LEN:
        raise AuthError("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed token: expected 3 parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
    except ValueError:
        raise AuthError("malformed token header")
    if not isinstance(header, dict):
        raise AuthError("malformed token header")
    alg = header.get("alg")
    if alg != "HS256":  # refuses "none" and every algorithm-confusion attempt
        raise AuthError("unsupported alg %r" % (alg,))
    sig = b64url_decode(parts[2])
    if not compare_digest(sig, hmac_sha256(key, parts[0] + "." + parts[1])):
        raise AuthError("bad signature")
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except ValueError:
        raise AuthError("malformed token payload")
    if not isinstance(claims, dict):
        raise AuthError("malformed token payload")
    if now is None:
        now = _now_s()
    exp = claims.get("exp")
    if exp is None and require_exp:
        raise AuthError("token has no exp")
    if exp is not None:
        if not isinstance(exp, (int, float)):
            raise AuthError("exp is not a number")
        if now > exp + leeway:
            raise AuthError("token expired")
    nbf = claims.get("nbf")
    if nbf is not None:
        if not isinstance(nbf, (int, float)):
            raise AuthError("nbf is not a number")
        if now + leeway < nbf:
            raise AuthError("token not yet valid")
    if audience is not None and "aud" in claims:
        aud = claims["aud"]
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise AuthError("token is for another audience")
    return claims


# --- roles -------------------------------------------------------------------------------------------------------

def role_at_least(have, need):
    """True when role `have` is `need` or above (viewer < operator < admin); unknown roles are never enough."""
    if have not in ROLES or need not in ROLES:
        return False
    return ROLES.index(have) >= ROLES.index(need)


# --- static API tokens -------------------------------------------------------------------------------------------

def hash_token(tok):
    """The form a static API token is stored in (config, flash): hex SHA-256 of its UTF-8 bytes."""
    return hexlify(hashlib.sha256(_b(tok)).digest())


def _static_entries(static):
    # Accepted shapes (config may give any of them): {"<hex>": "role"}, [{"sha256": "<hex>", "role": "…", "name"?}],
    # or bare "<hex>" strings, which get the least privilege (viewer).
    if isinstance(static, dict):
        for h in static:
            yield h, static[h], None
        return
    for e in static:
        if isinstance(e, dict):
            yield e.get("sha256") or e.get("hash") or "", e.get("role", "viewer"), e.get("name")
        else:
            yield e, "viewer", None


def verify_static(tok, static):
    """Claims for a static token whose hash is listed, else None. Every entry is compared (no early exit)."""
    h = hash_token(tok)
    found = None
    for eh, role, name in _static_entries(static):
        if isinstance(eh, str) and compare_digest(h, eh.lower()) and found is None:
            found = {"sub": name or "static:" + h[:8], "role": role, "static": True}
    return found


# --- rate limiting -----------------------------------------------------------------------------------------------

class RateLimiter:
    """Token bucket per client key (e.g. the peer IP): `rate_per_s` sustained, `burst` at once."""

    #: clients tracked at once; the least recently seen is forgotten first (a Pico cannot keep an unbounded table)
    max_clients = 32

    def __init__(self, rate_per_s, burst, max_clients=None, clock=ticks_ms):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = burst
        if max_clients is not None:
            self.max_clients = max_clients
        self._clock = clock
        self._b = {}  # client -> [tokens, last_ticks_ms]

    def allow(self, client, cost=1):
        """(True, 0) if the request may go ahead, else (False, seconds until it would)."""
        now = self._clock()
        b = self._b.get(client)
        if b is None:
            if len(self._b) >= self.max_clients:
                self._evict(now)
            b = self._b[client] = [float(self.burst), now]
        else:
            elapsed = ticks_diff(now, b[1])
            if elapsed > 0:
                b[0] = min(float(self.burst), b[0] + elapsed * self.rate / 1000)
            b[1] = now
        if b[0] >= cost:
            b[0] -= cost
            return True, 0
        wait = (cost - b[0]) / self.rate
        iw = int(wait)
        return False, iw if iw >= wait else iw + 1

    def _evict(self, now):
        oldest = None
        age = -1
        for k in self._b:
            a = ticks_diff(now, self._b[k][1])
            if a > age:
                oldest, age = k, a
        del self._b[oldest]

    def __len__(self):
        return len(self._b)


# --- the device's identity and its registration client -----------------------------------------------------------

class AuthManager:
    """Registers the device with ServiceDiscovery and keeps its JWT fresh; verifies tokens for the device's own API."""

    #: share of the token lifetime left at which ensure_token() refreshes (with a 60 s floor)
    refresh_fraction = 0.1
    #: leeway (s) for exp/nbf of tokens presented to the device's API
    leeway_s = JWT_LEEWAY_S
    #: JWTs remembered as verified (the whole header text → claims, until exp): a client repeats its token on every
    #: request, and re-checking the HMAC and re-parsing the claims each time is most of an authenticated request's cost
    verified_cache_size = 4

    def __init__(self, device_id, device_key, sd_url=None, info=None, namespace=None, clock=ticks_ms, now_s=None):
        if not device_id or not device_key:
            raise ValueError("device_id and device_key are required")
        self.device_id = device_id
        self._key = _b(device_key)
        self.sd_url = sd_url
        self.info = info or {}
        self.token = None
        self.token_expires_in = 0
        self.services = {}
        self.namespace = namespace  # from the key file; the registration answer confirms it
        self.intervals = {}
        self.server_time = None
        self.static_tokens = ()
        self.registrations = 0
        self.refreshes = 0
        self._clock = clock
        self._now_s = now_s  # wall clock for exp checks (e.g. TimeSyncManager); None: local clock
        self._got_at = 0
        self._verified = {}

    def __repr__(self):  # never show the key or the token
        return "<AuthManager %s registered=%s>" % (self.device_id, self.token is not None)

    def signature(self, nonce):
        """hex(HMAC-SHA256(device_key, nonce + "|" + device_id)) — the answer to a registration challenge."""
        return hexlify(hmac_sha256(self._key, nonce + "|" + self.device_id))

    def _url(self, name):
        if not self.sd_url:
            raise AuthError("no service discovery URL")
        return self.sd_url.rstrip("/") + "/" + name

    @staticmethod
    def _answer(resp, what):
        if resp.status != 200:
            reason = ""
            try:
                reason = resp.json().get("error", "")
            except Exception:
                pass
            e = AuthError("%s refused: HTTP %d %s" % (what, resp.status, reason))
            e.status = resp.status  # the control plane answered: 401/403 refuse this device's id or key
            raise e
        try:
            d = resp.json()
        except Exception:
            d = None
        if not isinstance(d, dict):
            raise AuthError("%s: answer is not a JSON object" % what)
        return d

    async def register(self, http, sd_url=None, info=None):
        """Challenge → register. Raises AuthError when refused, HTTPError when the network fails."""
        if sd_url:
            self.sd_url = sd_url
        if info:
            self.info = info
        body = {"device_id": self.device_id}
        if self.namespace:
            body["namespace"] = self.namespace
        ch = self._answer(await http.request("POST", self._url("challenge"), json=body), "challenge")
        nonce = ch.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise AuthError("challenge: no nonce in answer")
        req = {}
        for k in self.info:
            req[k] = self.info[k]
        req["device_id"] = self.device_id
        req["nonce"] = nonce
        req["signature"] = self.signature(nonce)
        d = self._answer(await http.request("POST", self._url("register"), json=req), "register")
        tok = d.get("token")
        services = d.get("services")
        if not isinstance(tok, str) or tok.count(".") != 2 or not isinstance(services, dict):
            raise AuthError("register: answer lacks token or services")
        self._set_token(tok, d.get("token_expires_in"))
        self.services = services
        self.namespace = d.get("namespace", self.namespace)
        iv = d.get("intervals")
        self.intervals = iv if isinstance(iv, dict) else {}
        self.server_time = d.get("server_time")
        self.registrations += 1
        return d

    def _set_token(self, tok, expires_in):
        if not isinstance(expires_in, int) or expires_in <= 0:
            expires_in = 3600
        self.token = tok
        self.token_expires_in = expires_in
        self._got_at = self._clock()  # monotonic: the device clock may not be synced yet

    def seconds_left(self):
        if self.token is None:
            return 0
        return self.token_expires_in - ticks_diff(self._clock(), self._got_at) // 1000

    def needs_refresh(self):
        life = self.token_expires_in
        margin = max(int(life * self.refresh_fraction), _MIN_REFRESH_S)
        margin = min(margin, life // 2)  # a very short lifetime would otherwise refresh on every call
        return self.token is None or self.seconds_left() <= margin

    def invalidate(self):
        """Forget the token (a service answered 401): the next ensure_token() registers again."""
        self.token = None

    async def refresh(self, http):
        url = self.services.get("refresh") or self._url("refresh")
        resp = await http.request("POST", url, json={}, headers={"Authorization": "Bearer " + self.token})
        d = self._answer(resp, "refresh")
        tok = d.get("token")
        if not isinstance(tok, str) or tok.count(".") != 2:
            raise AuthError("refresh: answer lacks token")
        self._set_token(tok, d.get("token_expires_in"))
        self.refreshes += 1
        return tok

    async def ensure_token(self, http):
        """A token good for a while: registers, refreshes when little lifetime is left, re-registers on refusal."""
        if self.token is None or self.seconds_left() <= 0:
            await self.register(http)
        elif self.needs_refresh():
            try:
                await self.refresh(http)
            except AuthError as e:
                _warn("token refresh refused; registering again", reason=str(e))
                self.token = None
                await self.register(http)
        return self.token

    def auth_header(self):
        return {"Authorization": "Bearer " + self.token} if self.token else {}

    # --- the device's own API ----------------------------------------------------------------------------------

    def verify(self, bearer, static_hashes=None):
        """Claims (with a valid `role`) for an API caller's token, or AuthError.

        bearer: the Authorization header value ("Bearer …") or the bare token. A JWT must be HS256-signed with this
        device's key (`picoiot token --device`), carry a role viewer/operator/admin and an `exp`, and its `aud`, when present, must
        name this device (`sub` is the person). Anything else is looked up by SHA-256 among the static tokens
        (static_hashes, or self.static_tokens as hot-reloaded from config).
        """
        if not isinstance(bearer, str) or not bearer:
            raise AuthError("missing token")
        now = self._now_s() if self._now_s else _now_s()
        # Remembered JWTs are keyed by the text as it came (the whole header value): a hit takes no copy of the token
        # (stripping "Bearer " copied its ≈ 250 bytes on every request), and any other text is not a hit.
        claims = self._verified.get(bearer)
        if claims is not None:
            if now <= claims["exp"] + self.leeway_s:  # only tokens with an exp are remembered
                return claims
            del self._verified[bearer]  # expired: the full check below says so
        tok = bearer
        if tok[:7].lower() == "bearer ":
            tok = tok[7:].strip()
        if not tok:
            raise AuthError("missing token")
        if tok.count(".") == 2:
            claims = jwt_decode(tok, self._key, now=now, leeway=self.leeway_s, audience=self.device_id,
                                require_exp=True)
            if claims.get("role") not in ROLES:
                raise AuthError("token has no valid role")
            if len(bearer) <= 520:  # a cached token must not cost much heap
                if len(self._verified) >= self.verified_cache_size:
                    del self._verified[next(iter(self._verified))]
                self._verified[bearer] = claims
            return claims
        claims = verify_static(tok, self.static_tokens if static_hashes is None else static_hashes)
        if claims is None:
            raise AuthError("unknown token")
        if claims["role"] not in ROLES:
            raise AuthError("static token has no valid role")
        return claims
