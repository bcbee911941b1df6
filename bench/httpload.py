"""A closed-loop HTTP/1.0 load client on raw non-blocking sockets (one selector, N connections in flight): each slot
connects, sends one GET, reads until the server closes (microdot speaks HTTP/1.0 and closes every connection), records
the status and the connect-to-close latency, and starts the next request. Bounded by a request count and a duration.

Run as its own process so the client's work never shares a CPU time slice with the measuring script:

    python bench/httpload.py PORT PATH [--header 'Name: value'] [-c 3] [-n 5000] [-t 10] [--warmup 50] [--sources 1]

prints one JSON object: {"requests", "elapsed_s", "rps", "codes": {status: count}, "p50_ms", "p99_ms", "errors"}.
"""
from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import time


def _percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def load(port: int, path: str, headers: dict | None = None, concurrency: int = 3, requests: int = 5000,
         seconds: float = 10.0, warmup: int = 50, sources: int = 1) -> dict:
    """sources: client addresses used in turn, 127.0.0.1 … 127.0.0.<sources> (loopback answers all of 127/8), so a
    per-client-address rate limit on the server sees several clients rather than one."""
    req = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
    for k, v in (headers or {}).items():
        req += f"{k}: {v}\r\n"
    req = (req + "\r\n").encode()
    sel = selectors.DefaultSelector()
    codes: dict[str, int] = {}
    lat: list[float] = []
    state = {"started": 0, "done": 0, "errors": 0, "t0": None}
    total = warmup + requests

    def start():
        if state["started"] >= total:
            return
        if state["t0"] is not None and time.perf_counter() - state["t0"] > seconds:
            return
        state["started"] += 1
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((f"127.0.0.{1 + state['started'] % sources}", 0))
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            finish(None, None)
            return
        sel.register(s, selectors.EVENT_WRITE, {"t": time.perf_counter(), "out": req, "buf": b""})

    def finish(s, ctx):
        n = state["done"]
        state["done"] += 1
        if state["done"] == warmup:  # the measured window starts when the warm-up requests are through
            state["t0"] = time.perf_counter()
        if s is None or ctx is None or not ctx["buf"].startswith(b"HTTP/"):
            if n >= warmup:
                state["errors"] += 1
        elif n >= warmup:
            code = ctx["buf"].split(b" ", 2)[1].decode()
            codes[code] = codes.get(code, 0) + 1
            lat.append((time.perf_counter() - ctx["t"]) * 1000)
        if s is not None:
            sel.unregister(s)
            s.close()
        start()

    if warmup == 0:
        state["t0"] = time.perf_counter()
    for _ in range(concurrency):
        start()
    while sel.get_map():
        for key, ev in sel.select(timeout=5):
            s, ctx = key.fileobj, key.data
            try:
                if ctx["out"]:
                    sent = s.send(ctx["out"])
                    ctx["out"] = ctx["out"][sent:]
                    if not ctx["out"]:
                        sel.modify(s, selectors.EVENT_READ, ctx)
                    continue
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                finish(s, None)
                continue
            if chunk:
                ctx["buf"] += chunk
            else:
                finish(s, ctx)
    elapsed = time.perf_counter() - (state["t0"] or time.perf_counter())
    n = sum(codes.values())
    return {"requests": n, "elapsed_s": round(elapsed, 3), "rps": round(n / elapsed, 1) if elapsed > 0 else 0.0,
            "codes": codes, "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99), "errors": state["errors"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("path")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("-c", "--concurrency", type=int, default=3)
    ap.add_argument("-n", "--requests", type=int, default=5000)
    ap.add_argument("-t", "--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--sources", type=int, default=1, help="client addresses 127.0.0.1..N, used in turn")
    a = ap.parse_args(argv)
    headers = dict(h.split(": ", 1) for h in a.header)
    print(json.dumps(load(a.port, a.path, headers, a.concurrency, a.requests, a.seconds, a.warmup,
                          a.sources)))


if __name__ == "__main__":
    main()
