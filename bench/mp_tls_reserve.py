# HTTPS requests through iotlib's HTTPClient from a heap cut into 1K holes, the way a device's heap looks after it has
# run a while. Run by bench/tls_session.py: micropython mp_tls_reserve.py URL CA.der RESERVE_BYTES REQUESTS
# (RESERVE_BYTES 0: the client holds no block, the baseline). Prints one line per request and a summary.
import gc
import sys

from iotlib.compat import asyncio
from iotlib.http import HTTPClient, HTTPError


def main():
    url, ca, reserve, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    HTTPClient.tls_reserve = reserve
    with open(ca, "rb") as f:
        der = f.read()
    c = HTTPClient(cadata=der)
    c._tls()  # the context and its CA, made before the heap is cut up (a device makes it at its first call)
    keep, holes = [], []
    try:
        while True:
            keep.append(bytearray(1024))
            holes.append(bytearray(1024))
    except MemoryError:
        pass
    holes = None
    gc.collect()
    ok = 0
    for _ in range(n):
        try:
            r = asyncio.run(c.request("GET", url))
            ok += r.status == 200
            r = None  # a device parses an answer and drops it
        except (HTTPError, MemoryError) as e:
            print("failed:", e)
    print("free=%d ok=%d of %d held=%d" % (gc.mem_free(), ok, n, HTTPClient.held))


main()
