# SHA-1 (FIPS 180-4) for interpreters built without hashlib.sha1: the 32-bit unix build used for memory measurements
# has no TLS library, and with it no SHA-1. A Pico W's firmware has it built in (the WebSocket handshake needs it), so
# the simulated board supplies it, from the simulator's image, outside the heap that is counted. Slow; fine for a
# 60-byte handshake key.
_M32 = 0xFFFFFFFF


def _rotl(x, n):
    return ((x << n) | (x >> (32 - n))) & _M32


class sha1:
    """hashlib.sha1's interface: sha1(data).digest() (the whole message at once, which is all a handshake needs)."""

    def __init__(self, data=b""):
        self._data = bytes(data)

    def update(self, data):
        self._data += bytes(data)

    def digest(self):
        data = self._data
        ml = len(data)
        data = data + b"\x80" + b"\x00" * ((55 - ml) % 64) + (ml * 8).to_bytes(8, "big")
        h = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0]
        for off in range(0, len(data), 64):
            w = [int.from_bytes(data[off + 4 * i:off + 4 * i + 4], "big") for i in range(16)]
            for i in range(16, 80):
                w.append(_rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1))
            a, b, c, d, e = h
            for i in range(80):
                if i < 20:
                    f, k = (b & c) | (~b & d), 0x5A827999
                elif i < 40:
                    f, k = b ^ c ^ d, 0x6ED9EBA1
                elif i < 60:
                    f, k = (b & c) | (b & d) | (c & d), 0x8F1BBCDC
                else:
                    f, k = b ^ c ^ d, 0xCA62C1D6
                a, b, c, d, e = (_rotl(a, 5) + (f & _M32) + e + k + w[i]) & _M32, a, _rotl(b, 30), c, d
            h = [(x + y) & _M32 for x, y in zip(h, (a, b, c, d, e))]
        return b"".join(x.to_bytes(4, "big") for x in h)
