"""TLS on the device's heap, against a CPython HTTPS server with a trustme test CA on 127.0.0.1:

1. the GC-heap cost of one TLS client session (the device's TLS: CERT_REQUIRED, DER cadata, server_hostname);
2. HTTPS requests through iotlib's HTTPClient from a heap cut into 1K holes (a device that has run a while), with the
   client's TLS block (HTTPClient.tls_reserve) and without it (the baseline), answers of 10, 1,700 and 3,000 bytes.

    .venv/bin/python bench/tls_session.py [--micropython PATH]

The pinned unix port's mbedtls allocates from the C heap, so there (1) shows only the Python-side objects and (2)
succeeds either way. On rp2 mbedtls allocates from the GC heap; a unix build whose mbedtls does too (rp2's bare-metal
mbedtls configuration) shows both (docs/hardware.md §7).
"""
from __future__ import annotations

import argparse
import http.server
import os
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import trustme

from picoiot import paths


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"x" * int(self.path.strip("/") or 2)  # GET /N answers N bytes
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micropython", metavar="PATH", help="the unix micropython to measure (default: the pinned one)")
    ap.add_argument("--requests", type=int, default=10)
    a = ap.parse_args(argv)
    paths.use_micropython(a.micropython)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    with tempfile.TemporaryDirectory() as d:
        der = Path(d) / "ca.der"
        der.write_bytes(ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode()))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(ctx)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        script = Path(__file__).with_name("mp_tls_session.py")
        for heap in ("192K", "320K"):
            out = subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap}", str(script),
                                  str(srv.server_address[1]), str(der)], capture_output=True, text=True, timeout=60)
            print(f"session, heap {heap}: {(out.stdout or out.stderr).strip()}")
        reserve = Path(__file__).with_name("mp_tls_reserve.py")
        env = dict(os.environ, MICROPYPATH=f"{paths.FIRMWARE}:.frozen")
        for size in (10, 1700, 3000):
            for held in (24 * 1024, 0):
                url = f"https://127.0.0.1:{srv.server_address[1]}/{size}"
                out = subprocess.run([paths.micropython_bin(), "-X", "heapsize=160K", str(reserve), url, str(der),
                                      str(held), str(a.requests)], capture_output=True, text=True, timeout=300,
                                     env=env)
                last = (out.stdout or out.stderr).strip().splitlines()[-1:] or ["no output"]
                print(f"fragmented heap 160K, answers of {size} B, {'TLS block 24K' if held else 'no TLS block'}: "
                      f"{last[0]}")
        srv.shutdown()
    print(f"interpreter: {paths.micropython_info()}")


if __name__ == "__main__":
    sys.exit(main())
