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
_M64 = 0xFFFFFFFFFFFFFFFF

# SHA-512's constants (FIPS 180-4 §4.2.3, §5.3.5): 80 round constants (fractional parts of the cube roots of the first
# 80 primes) and the initial hash (square roots of the first 8), 8 bytes each, big-endian. Bytes literals, not lists
# built at first use: a list of 80 big ints made during the first manifest check stays for good and lies spread through
# the heap (it cut the largest free block of a device from ~180K to ~5K); one bytes object is one block loaded with the
# code (or left in flash when the code runs from ROMFS). tests/firmware/test_ota.py derives them again to check them.
_K = (
    b"\x42\x8a\x2f\x98\xd7\x28\xae\x22\x71\x37\x44\x91\x23\xef\x65\xcd"
    b"\xb5\xc0\xfb\xcf\xec\x4d\x3b\x2f\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc"
    b"\x39\x56\xc2\x5b\xf3\x48\xb5\x38\x59\xf1\x11\xf1\xb6\x05\xd0\x19"
    b"\x92\x3f\x82\xa4\xaf\x19\x4f\x9b\xab\x1c\x5e\xd5\xda\x6d\x81\x18"
    b"\xd8\x07\xaa\x98\xa3\x03\x02\x42\x12\x83\x5b\x01\x45\x70\x6f\xbe"
    b"\x24\x31\x85\xbe\x4e\xe4\xb2\x8c\x55\x0c\x7d\xc3\xd5\xff\xb4\xe2"
    b"\x72\xbe\x5d\x74\xf2\x7b\x89\x6f\x80\xde\xb1\xfe\x3b\x16\x96\xb1"
    b"\x9b\xdc\x06\xa7\x25\xc7\x12\x35\xc1\x9b\xf1\x74\xcf\x69\x26\x94"
    b"\xe4\x9b\x69\xc1\x9e\xf1\x4a\xd2\xef\xbe\x47\x86\x38\x4f\x25\xe3"
    b"\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5\x24\x0c\xa1\xcc\x77\xac\x9c\x65"
    b"\x2d\xe9\x2c\x6f\x59\x2b\x02\x75\x4a\x74\x84\xaa\x6e\xa6\xe4\x83"
    b"\x5c\xb0\xa9\xdc\xbd\x41\xfb\xd4\x76\xf9\x88\xda\x83\x11\x53\xb5"
    b"\x98\x3e\x51\x52\xee\x66\xdf\xab\xa8\x31\xc6\x6d\x2d\xb4\x32\x10"
    b"\xb0\x03\x27\xc8\x98\xfb\x21\x3f\xbf\x59\x7f\xc7\xbe\xef\x0e\xe4"
    b"\xc6\xe0\x0b\xf3\x3d\xa8\x8f\xc2\xd5\xa7\x91\x47\x93\x0a\xa7\x25"
    b"\x06\xca\x63\x51\xe0\x03\x82\x6f\x14\x29\x29\x67\x0a\x0e\x6e\x70"
    b"\x27\xb7\x0a\x85\x46\xd2\x2f\xfc\x2e\x1b\x21\x38\x5c\x26\xc9\x26"
    b"\x4d\x2c\x6d\xfc\x5a\xc4\x2a\xed\x53\x38\x0d\x13\x9d\x95\xb3\xdf"
    b"\x65\x0a\x73\x54\x8b\xaf\x63\xde\x76\x6a\x0a\xbb\x3c\x77\xb2\xa8"
    b"\x81\xc2\xc9\x2e\x47\xed\xae\xe6\x92\x72\x2c\x85\x14\x82\x35\x3b"
    b"\xa2\xbf\xe8\xa1\x4c\xf1\x03\x64\xa8\x1a\x66\x4b\xbc\x42\x30\x01"
    b"\xc2\x4b\x8b\x70\xd0\xf8\x97\x91\xc7\x6c\x51\xa3\x06\x54\xbe\x30"
    b"\xd1\x92\xe8\x19\xd6\xef\x52\x18\xd6\x99\x06\x24\x55\x65\xa9\x10"
    b"\xf4\x0e\x35\x85\x57\x71\x20\x2a\x10\x6a\xa0\x70\x32\xbb\xd1\xb8"
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8\x1e\x37\x6c\x08\x51\x41\xab\x53"
    b"\x27\x48\x77\x4c\xdf\x8e\xeb\x99\x34\xb0\xbc\xb5\xe1\x9b\x48\xa8"
    b"\x39\x1c\x0c\xb3\xc5\xc9\x5a\x63\x4e\xd8\xaa\x4a\xe3\x41\x8a\xcb"
    b"\x5b\x9c\xca\x4f\x77\x63\xe3\x73\x68\x2e\x6f\xf3\xd6\xb2\xb8\xa3"
    b"\x74\x8f\x82\xee\x5d\xef\xb2\xfc\x78\xa5\x63\x6f\x43\x17\x2f\x60"
    b"\x84\xc8\x78\x14\xa1\xf0\xab\x72\x8c\xc7\x02\x08\x1a\x64\x39\xec"
    b"\x90\xbe\xff\xfa\x23\x63\x1e\x28\xa4\x50\x6c\xeb\xde\x82\xbd\xe9"
    b"\xbe\xf9\xa3\xf7\xb2\xc6\x79\x15\xc6\x71\x78\xf2\xe3\x72\x53\x2b"
    b"\xca\x27\x3e\xce\xea\x26\x61\x9c\xd1\x86\xb8\xc7\x21\xc0\xc2\x07"
    b"\xea\xda\x7d\xd6\xcd\xe0\xeb\x1e\xf5\x7d\x4f\x7f\xee\x6e\xd1\x78"
    b"\x06\xf0\x67\xaa\x72\x17\x6f\xba\x0a\x63\x7d\xc5\xa2\xc8\x98\xa6"
    b"\x11\x3f\x98\x04\xbe\xf9\x0d\xae\x1b\x71\x0b\x35\x13\x1c\x47\x1b"
    b"\x28\xdb\x77\xf5\x23\x04\x7d\x84\x32\xca\xab\x7b\x40\xc7\x24\x93"
    b"\x3c\x9e\xbe\x0a\x15\xc9\xbe\xbc\x43\x1d\x67\xc4\x9c\x10\x0d\x4c"
    b"\x4c\xc5\xd4\xbe\xcb\x3e\x42\xb6\x59\x7f\x29\x9c\xfc\x65\x7e\x2a"
    b"\x5f\xcb\x6f\xab\x3a\xd6\xfa\xec\x6c\x44\x19\x8c\x4a\x47\x58\x17"
)
_H0 = (
    b"\x6a\x09\xe6\x67\xf3\xbc\xc9\x08\xbb\x67\xae\x85\x84\xca\xa7\x3b"
    b"\x3c\x6e\xf3\x72\xfe\x94\xf8\x2b\xa5\x4f\xf5\x3a\x5f\x1d\x36\xf1"
    b"\x51\x0e\x52\x7f\xad\xe6\x82\xd1\x9b\x05\x68\x8c\x2b\x3e\x6c\x1f"
    b"\x1f\x83\xd9\xab\xfb\x41\xbd\x6b\x5b\xe0\xcd\x19\x13\x7e\x21\x79"
)


def _rotr(x, n):
    return ((x >> n) | (x << (64 - n))) & _M64


def sha512(data):
    """SHA-512 digest of bytes, or of a list of byte strings taken as one (hashlib's when the port has it)."""
    out = [None]
    for _ in sha512_steps(data, out):
        pass
    return out[0]


def _block(h, blk):
    w = [0] * 80  # one allocation of the final size: appending grew it by reallocations into ever larger blocks
    for i in range(16):
        w[i] = int.from_bytes(blk[8 * i:8 * i + 8], "big")
    for i in range(16, 80):
        a, b = w[i - 15], w[i - 2]
        s0 = _rotr(a, 1) ^ _rotr(a, 8) ^ (a >> 7)
        s1 = _rotr(b, 19) ^ _rotr(b, 61) ^ (b >> 6)
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & _M64
    a, b, c, d, e, f, g, hh = h
    for i in range(80):
        t1 = (hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + ((e & f) ^ (~e & g))
              + int.from_bytes(_K[8 * i:8 * i + 8], "big") + w[i]) & _M64
        t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c))) & _M64
        hh, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M64, c, b, a, (t1 + t2) & _M64
    return [(x + y) & _M64 for x, y in zip(h, (a, b, c, d, e, f, g, hh))]


def sha512_steps(data, out):
    """Generator: sets out[0] to the digest of data (bytes, or a list of byte strings hashed as one: no joined copy of
    a large message), yielding after every 128-byte block (pure Python is slow on a Pico)."""
    parts = data if isinstance(data, (list, tuple)) else (data,)
    if _hw_sha512 is not None:
        hw = _hw_sha512()
        for p in parts:
            hw.update(p)
        out[0] = hw.digest()
        return
    h = [int.from_bytes(_H0[i:i + 8], "big") for i in range(0, 64, 8)]
    blk = bytearray(128)  # one block at a time: the message is never copied whole
    n = ml = 0
    for p in parts:
        mv = memoryview(p)
        i, size = 0, len(mv)
        ml += size
        while i < size:
            k = min(128 - n, size - i)
            blk[n:n + k] = mv[i:i + k]
            n += k
            i += k
            if n == 128:
                h = _block(h, blk)
                n = 0
                yield
    blk[n] = 0x80
    n += 1
    if n > 112:
        blk[n:] = bytes(128 - n)
        h = _block(h, blk)
        n = 0
        yield
    blk[n:112] = bytes(112 - n)
    blk[112:] = (ml * 8).to_bytes(16, "big")
    h = _block(h, blk)
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


# The base point B (RFC 8032 §5.1): its coordinates as constants, built into a point per verification (no module-level
# point made at first use and kept).
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960


def _base():
    return (_BX, _BY, 1, _BX * _BY % _P)


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
    for _ in sha512_steps((signature[:32], public_key, message), digest):  # the message is not copied
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
