# Ed25519 signature verification (RFC 8032) in pure Python for OTA manifests. MicroPython has no SHA-512 and no
# crypto library, so both are here; big-int arithmetic is slow but a manifest is verified once per update.
# `verify_steps` is a generator that yields every few bits of the scalar multiplication, so an async caller can
# await (and feed the watchdog) between steps instead of stalling the loop for the whole verification.
try:
    from hashlib import sha512 as _hw_sha512
except ImportError:
    _hw_sha512 = None

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_BY = (4 * pow(5, _P - 2, _P)) % _P
_M64 = 0xFFFFFFFFFFFFFFFF

_K = None


def _k():
    global _K
    if _K is None:  # the SHA-512 round constants: fractional parts of the cube roots of the first 80 primes
        primes = []
        n = 2
        while len(primes) < 80:
            if all(n % q for q in primes if q * q <= n):
                primes.append(n)
            n += 1
        _K = [_frac_root(q, 3, 64) for q in primes]
    return _K


def _frac_root(q, k, bits):
    # floor(2**bits * frac(q ** (1/k))) by integer bisection (no floats: exact on every port)
    lo, hi = 0, 1 << (bits + 8)
    target = q << (bits * k)
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if mid ** k <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo & ((1 << bits) - 1)


def _rotr(x, n):
    return ((x >> n) | (x << (64 - n))) & _M64


def sha512(data):
    """SHA-512 digest of bytes (hashlib's when the port has it)."""
    out = [None]
    for _ in sha512_steps(data, out):
        pass
    return out[0]


def sha512_steps(data, out):
    """Generator: sets out[0] to the digest, yielding after every 128-byte block (pure Python is slow on a Pico)."""
    if _hw_sha512 is not None:
        out[0] = _hw_sha512(data).digest()
        return
    K = _k()
    h = [_frac_root(q, 2, 64) for q in (2, 3, 5, 7, 11, 13, 17, 19)]
    ml = len(data)
    data = bytes(data) + b"\x80" + b"\x00" * ((111 - ml) % 128) + (ml * 8).to_bytes(16, "big")
    for off in range(0, len(data), 128):
        w = [int.from_bytes(data[off + i * 8:off + i * 8 + 8], "big") for i in range(16)]
        for i in range(16, 80):
            a, b = w[i - 15], w[i - 2]
            s0 = _rotr(a, 1) ^ _rotr(a, 8) ^ (a >> 7)
            s1 = _rotr(b, 19) ^ _rotr(b, 61) ^ (b >> 6)
            w.append((w[i - 16] + s0 + w[i - 7] + s1) & _M64)
        a, b, c, d, e, f, g, hh = h
        for i in range(80):
            t1 = (hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) & _M64
            t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c))) & _M64
            hh, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M64, c, b, a, (t1 + t2) & _M64
        h = [(x + y) & _M64 for x, y in zip(h, (a, b, c, d, e, f, g, hh))]
        yield
    out[0] = b"".join(x.to_bytes(8, "big") for x in h)


def _add(P, Q):
    A = (P[1] - P[0]) * (Q[1] - Q[0]) % _P
    B = (P[1] + P[0]) * (Q[1] + Q[0]) % _P
    C = 2 * P[3] * Q[3] * _D % _P
    D = 2 * P[2] * Q[2] % _P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % _P, G * H % _P, F * G % _P, E * H % _P)


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decode(s):
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def _encode(P):
    zi = pow(P[2], _P - 2, _P)
    x, y = P[0] * zi % _P, P[1] * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_B = None


def _base():
    global _B
    if _B is None:
        _B = _decode(_BY.to_bytes(32, "little"))
    return _B


def verify_steps(public_key, message, signature, out, bits_per_step=4):
    """Generator: verifies and sets out[0] to True/False; yields between steps (an async caller awaits there)."""
    out[0] = False
    if len(public_key) != 32 or len(signature) != 64:
        return
    A = _decode(public_key)
    yield
    if A is None:
        return
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return
    digest = [None]
    for _ in sha512_steps(bytes(signature[:32]) + bytes(public_key) + bytes(message), digest):
        yield
    k = int.from_bytes(digest[0], "little") % _L
    neg_a = ((_P - A[0]) % _P, A[1], A[2], (_P - A[3]) % _P)
    B = _base()
    both = _add(B, neg_a)
    acc = (0, 1, 1, 0)
    # Shamir's trick: [s]B + [k](-A) in one pass of 253 doublings
    for i in range(255, -1, -1):
        acc = _add(acc, acc)
        bs, bk = (s >> i) & 1, (k >> i) & 1
        if bs and bk:
            acc = _add(acc, both)
        elif bs:
            acc = _add(acc, B)
        elif bk:
            acc = _add(acc, neg_a)
        if i % bits_per_step == 0:
            yield
    out[0] = _encode(acc) == bytes(signature[:32])


def verify(public_key, message, signature):
    """True if signature (64 bytes) is public_key's (32 bytes) Ed25519 signature of message."""
    out = [False]
    for _ in verify_steps(public_key, message, signature, out):
        pass
    return out[0]
