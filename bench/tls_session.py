"""The GC-heap cost of one TLS client session under the unix MicroPython (the device's TLS: CERT_REQUIRED, DER cadata,
server_hostname), against a CPython HTTPS server with a trustme test CA on 127.0.0.1.

    .venv/bin/python bench/tls_session.py

The unix port's mbedtls allocates from the C heap, not the GC heap, so this shows only the Python-side objects; on
rp2 mbedtls allocates from the GC heap (docs/hardware.md §7 gives the published rp2 figure).
"""
from __future__ import annotations

import http.server
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
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


def main() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    with tempfile.TemporaryDirectory() as d:
        der = Path(d) / "ca.der"
        der.write_bytes(ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode()))
        srv = http.server.HTTPServer(("127.0.0.1", 0), _Ok)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(ctx)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        script = Path(__file__).with_name("mp_tls_session.py")
        for heap in ("192K", "320K"):
            out = subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap}", str(script),
                                  str(srv.server_address[1]), str(der)], capture_output=True, text=True, timeout=60)
            print(f"heap {heap}: {(out.stdout or out.stderr).strip()}")
        srv.shutdown()
    v = subprocess.run([paths.micropython_bin(), "-c", "import sys; print(sys.version)"], capture_output=True,
                       text=True).stdout.strip()
    print(f"micropython: {v}")


if __name__ == "__main__":
    sys.exit(main())
