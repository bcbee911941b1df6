"""An https device (a `ca` in its settings) holds one block of heap for its TLS session from boot, so that a heap cut
into small holes after hours of running can still open one; /metrics shows it (docs/hardware.md §7). A device without
a CA holds nothing. The control plane here is plain http: the block is held, never used."""
import base64
import json
import ssl

import trustme


def _metric(d, name: str) -> float:
    r = d.get("/metrics")
    assert r.status_code == 200, r.text
    return next(float(ln.rsplit(" ", 1)[1]) for ln in r.text.splitlines() if ln.startswith(name + " "))


def test_a_device_with_a_ca_holds_its_tls_block_and_shows_it(device_factory):
    d = device_factory("relays", name="with-ca", start=False)
    s = json.loads(d.child.settings.read_text())
    s["ca"] = base64.b64encode(ssl.PEM_cert_to_DER_cert(trustme.CA().cert_pem.bytes().decode())).decode()
    d.child.settings.write_text(json.dumps(s))
    d.start()
    assert _metric(d, "iotlib_tls_reserve_bytes") == 24 * 1024
    d.configure({"heartbeat_interval_s": 2})  # plain-http exchanges with the control plane leave the block alone
    assert _metric(d, "iotlib_tls_reserve_bytes") == 24 * 1024
    plain = device_factory("relays", name="without-ca")
    assert _metric(plain, "iotlib_tls_reserve_bytes") == 0
