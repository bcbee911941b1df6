"""iotlib.http over TLS against a CPython ssl server with a self-signed CA made here, with the client run under CPython
and under the real MicroPython unix port (whose TLS takes DER cadata only and reports a failed verification as
ValueError — the client must turn both into HTTPError)."""
import asyncio
import datetime
import ipaddress
import os
import ssl
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from picoiot import paths

sys.path.insert(0, str(paths.FIRMWARE))
from iotlib.http import HTTPClient, HTTPError  # noqa: E402


def _cert(cn, issuer_key=None, issuer_name=None, ca=False, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    return key, b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _cert("picoiot test CA", ca=True)
    srv_key, srv = _cert("localhost", ca_key, ca.subject,
                         sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    _, other_ca = _cert("some other CA", ca=True)
    (d / "srv.pem").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "srv.key").write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    for name, c in (("ca", ca), ("other", other_ca)):
        (d / f"{name}.der").write_bytes(c.public_bytes(serialization.Encoding.DER))
        (d / f"{name}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
    return d


async def _https_server(pki, host="127.0.0.1"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "srv.pem", pki / "srv.key")
    seen = []

    async def handle(reader, writer):
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            seen.append(line)
            body = b'{"tls": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass  # a client that refused our certificate
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, host, 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1], seen


@pytest.fixture
async def quiet_loop_errors():
    # handshakes the client aborts on purpose reach the loop's exception handler; keep them out of the log
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, ctx: None)


async def test_cpython_client_verifies_ca_pem_and_der(pki, quiet_loop_errors):
    srv, port, seen = await _https_server(pki)
    async with srv:
        for cadata in ((pki / "ca.pem").read_text(), (pki / "ca.der").read_bytes(), (pki / "ca.pem").read_bytes()):
            r = await HTTPClient(timeout_ms=3000, cadata=cadata).request("GET", f"https://localhost:{port}/x")
            assert r.status == 200 and r.json() == {"tls": True}
        assert seen[-1] == b"GET /x HTTP/1.1\r\n"


async def test_cpython_client_refuses_unknown_ca_and_wrong_name(pki, quiet_loop_errors):
    srv, port, seen = await _https_server(pki)
    async with srv:
        with pytest.raises(HTTPError, match="failed"):
            await HTTPClient(timeout_ms=3000, cadata=(pki / "other.der").read_bytes()).request(
                "GET", f"https://localhost:{port}/")
        with pytest.raises(HTTPError):  # the certificate names localhost / 127.0.0.1, not this
            await HTTPClient(timeout_ms=3000, cadata=(pki / "ca.der").read_bytes()).request(
                "GET", f"https://127.0.0.2:{port}/")
        assert seen == []
    with pytest.raises(HTTPError, match="TLS setup"):
        await HTTPClient(cadata="not a certificate").request("GET", "https://localhost:1/")


MP_CLIENT = """
import sys
import asyncio
from iotlib.http import HTTPClient, HTTPError
ca = open(sys.argv[1], "rb").read()
async def main():
    try:
        r = await HTTPClient(timeout_ms=8000, cadata=ca).request("GET", sys.argv[2])
        print("OK", r.status, r.body.decode())
    except HTTPError as e:
        print("HTTPError", e)
asyncio.run(main())
"""


async def _micropython(pki, ca_file, url, tmp_path):
    script = tmp_path / "tls_client.py"
    script.write_text(MP_CLIENT)
    env = dict(os.environ, MICROPYPATH=f"{paths.FIRMWARE}:.frozen")
    proc = await asyncio.create_subprocess_exec(paths.micropython_bin(), "-X", "heapsize=192K", str(script),
                                                str(pki / ca_file), url, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode().strip() + err.decode().strip()


async def test_micropython_client_verifies_the_server(pki, tmp_path, quiet_loop_errors):
    srv, port, seen = await _https_server(pki)
    async with srv:
        out = await _micropython(pki, "ca.der", f"https://localhost:{port}/mp", tmp_path)
        assert out == 'OK 200 {"tls": true}', out
        # PEM is converted to DER by the client (the unix port refuses PEM cadata itself)
        out = await _micropython(pki, "ca.pem", f"https://localhost:{port}/mp", tmp_path)
        assert out == 'OK 200 {"tls": true}', out
        assert seen == [b"GET /mp HTTP/1.1\r\n"] * 2


async def test_micropython_client_refuses_an_unknown_ca(pki, tmp_path, quiet_loop_errors):
    srv, port, seen = await _https_server(pki)
    async with srv:
        out = await _micropython(pki, "other.der", f"https://localhost:{port}/mp", tmp_path)
        assert out.startswith("HTTPError") and "localhost" in out, out
        assert seen == []


async def test_micropython_client_checks_the_host_name(pki, tmp_path, quiet_loop_errors):
    srv, port, seen = await _https_server(pki, host="127.0.0.2")  # Linux routes all of 127/8 to lo
    async with srv:
        out = await _micropython(pki, "ca.der", f"https://127.0.0.2:{port}/mp", tmp_path)
        assert out.startswith("HTTPError") and "does not match" in out, out
        assert seen == []
