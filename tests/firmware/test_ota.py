import os
import json
import fwtest
from iotlib import ed25519, fsutil, ota, otaboot
from iotlib.ota import OTAUpdateManager, OTAError

try:
    import hashlib
except ImportError:  # pragma: no cover
    import uhashlib as hashlib

RFC_PK = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a") \
    if hasattr(bytes, "fromhex") else None
RFC_SIG = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
SEED = b"\x11" * 32


def _unhex(s):
    return bytes(int(s[i:i + 2], 16) for i in range(0, len(s), 2))


def _hex(b):
    return "".join("%02x" % x for x in b)


def _mul(n, P):
    acc = (0, 1, 1, 0)
    while n:
        if n & 1:
            acc = ed25519._add(acc, P)
        P = ed25519._add(P, P)
        n >>= 1
    return acc


def _keypair(seed=SEED):
    h = ed25519.sha512(seed)
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:], ed25519._encode(_mul(a, ed25519._base()))


def _sign(msg, seed=SEED):
    a, prefix, pk = _keypair(seed)
    r = int.from_bytes(ed25519.sha512(prefix + msg), "little") % ed25519._L
    R = ed25519._encode(_mul(r, ed25519._base()))
    k = int.from_bytes(ed25519.sha512(R + pk + msg), "little") % ed25519._L
    return R + ((r + k * a) % ed25519._L).to_bytes(32, "little")


def _sha(b):
    return _hex(hashlib.sha256(b).digest())


def _release(version, files, seed=SEED):
    """(manifest text, signature hex, {sha: bytes}) for files {path: bytes}."""
    m = {"version": version, "files": [{"path": p, "sha256": _sha(files[p]), "size": len(files[p])} for p in files]}
    text = json.dumps(m)
    return text, _hex(_sign(text.encode(), seed)), dict((_sha(b), b) for b in files.values())


def _fetcher(blobs, truncate_at=None):
    async def fetch(sha, offset, length):
        data = blobs[sha]
        if truncate_at is not None:
            data = data[:truncate_at]
        return data[offset:offset + length]
    return fetch


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


OLD = {"main.py": b"print('v1')\n", "iotlib/a.py": b"A = 1\n" * 300}
NEW = {"main.py": b"print('v2')\n", "iotlib/a.py": b"A = 2\n" * 900, "iotlib/b.py": b"B = 2\n"}


def _device(files=OLD):
    root = fwtest.tmpdir("ota")
    for p in files:
        if "/" in p:
            fsutil.makedirs(root + "/" + p.rsplit("/", 1)[0])
        with open(root + "/" + p, "wb") as f:
            f.write(files[p])
    mgr = OTAUpdateManager(root, public_key=_keypair()[2])
    mgr.chunk_bytes = 1000
    return root, mgr


def _set(root):
    return dict((p, _read(root + "/" + p)) for p in ("main.py", "iotlib/a.py", "iotlib/b.py"))


def _is_old(root):
    s = _set(root)
    return s["main.py"] == OLD["main.py"] and s["iotlib/a.py"] == OLD["iotlib/a.py"] and s["iotlib/b.py"] is None


def _is_new(root):
    return _set(root) == NEW


def _stage_and_install(mgr, files=NEW, version="2.0"):
    text, sig, blobs = _release(version, files)

    async def go():
        m = await mgr.verify_manifest(text, sig)
        await mgr.stage(m, _fetcher(blobs))
        m["previous"] = "1.0"
        mgr.install(m)
    fwtest.run(go())


# --- Ed25519 ---------------------------------------------------------------------------------------------------------
def test_ed25519_rfc8032_vector_and_tampering():
    pk = _unhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = _unhex(RFC_SIG)
    assert ed25519.verify(pk, b"", sig)
    assert not ed25519.verify(pk, b"x", sig)
    bad = bytearray(sig)
    bad[5] ^= 1
    assert not ed25519.verify(pk, b"", bytes(bad))
    assert not ed25519.verify(pk, b"", sig[:63])
    # S >= L is refused (malleability)
    s = (int.from_bytes(sig[32:], "little") + ed25519._L).to_bytes(32, "little")
    assert not ed25519.verify(pk, b"", sig[:32] + s)


def test_pure_sha512_matches_known_digest():
    hw = ed25519._hw_sha512
    ed25519._hw_sha512 = None
    try:
        assert _hex(ed25519.sha512(b"abc"))[:32] == "ddaf35a193617abacc417349ae204131"
        assert _hex(ed25519.sha512(b"a" * 112))[:16] == "c01d080efd492776"
    finally:
        ed25519._hw_sha512 = hw


def test_pure_sha512_of_parts_is_the_digest_of_the_whole_at_every_block_edge():
    hw = ed25519._hw_sha512
    ed25519._hw_sha512 = None
    try:
        for n in (0, 1, 111, 112, 113, 127, 128, 129, 255, 300):
            msg = bytes((i * 7) & 255 for i in range(n))
            whole = ed25519.sha512(msg)
            assert ed25519.sha512([msg[:n // 3], b"", msg[n // 3:]]) == whole
            if hw is not None:  # CPython: hashlib's
                assert whole == hw(msg).digest(), n
    finally:
        ed25519._hw_sha512 = hw


def _frac_root(q, k, bits):
    # floor(2**bits * frac(q ** (1/k))) by integer bisection: how FIPS 180-4 defines SHA-512's constants
    lo, hi = 0, 1 << (bits + 8)
    target = q << (bits * k)
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if mid ** k <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo & ((1 << bits) - 1)


def test_sha512_constants_are_the_fips_180_4_ones():
    primes = []
    n = 2
    while len(primes) < 80:
        if all(n % q for q in primes if q * q <= n):
            primes.append(n)
        n += 1
    assert ed25519._K == b"".join(_frac_root(q, 3, 64).to_bytes(8, "big") for q in primes)
    assert ed25519._H0 == b"".join(_frac_root(q, 2, 64).to_bytes(8, "big") for q in primes[:8])


def test_verification_keeps_nothing_on_the_heap():
    # Whatever a first manifest check builds and keeps lies spread through the heap for good: the SHA-512 round
    # constants built at first use cut a device's largest free block from ~180K to ~5K, too little for TLS.
    import gc
    import sys
    sys.modules.pop("iotlib.ed25519", None)
    fresh = __import__("iotlib.ed25519", None, None, ["ed25519"])
    pk, sig = _unhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"), _unhex(RFC_SIG)
    mem = getattr(gc, "mem_alloc", None)
    gc.collect()
    before = mem() if mem else 0
    assert fresh.verify(pk, b"", sig)
    gc.collect()
    kept = (mem() - before) if mem else 0
    assert kept < 256, "a verification left %d bytes on the heap" % kept
    assert not [k for k, v in fresh.__dict__.items() if isinstance(v, (list, tuple, dict)) and not k.startswith("__")]


def test_own_signatures_verify_and_other_key_does_not():
    pk = _keypair()[2]
    sig = _sign(b"hello")
    assert ed25519.verify(pk, b"hello", sig)
    assert not ed25519.verify(_keypair(b"\x22" * 32)[2], b"hello", sig)


# --- manifest --------------------------------------------------------------------------------------------------------
def test_manifest_with_bad_signature_or_wrong_key_is_refused():
    root, mgr = _device()
    text, sig, _ = _release("2.0", NEW)
    m = fwtest.run(mgr.verify_manifest(text, sig))
    assert m["version"] == "2.0"
    e = fwtest.raises(OTAError, fwtest.run, mgr.verify_manifest(text.replace("2.0", "2.1"), sig))
    assert "signature" in str(e)
    other = _release("2.0", NEW, seed=b"\x33" * 32)
    e = fwtest.raises(OTAError, fwtest.run, mgr.verify_manifest(other[0], other[1]))
    assert "signature" in str(e)
    fwtest.raises(OTAError, fwtest.run, mgr.verify_manifest(text, "zz"))
    assert _is_old(root)


def test_manifest_shape_is_checked():
    ok = {"path": "main.py", "sha256": "a" * 64, "size": 3}
    ota.check_manifest({"version": "1", "files": [ok]}, 4, 100)
    for bad in ({"version": "", "files": [ok]}, {"version": "1", "files": []},
                {"version": "1", "files": [ok, ok]},
                {"version": "1", "files": [dict(ok, path="../x.py")]},
                {"version": "1", "files": [dict(ok, path="/main.py")]},
                {"version": "1", "files": [dict(ok, path="ota.json")]},
                {"version": "1", "files": [dict(ok, sha256="A" * 64)]},
                {"version": "1", "files": [dict(ok, size=101)]},
                {"version": "1", "files": [dict(ok, size=True)]}):
        fwtest.raises(OTAError, ota.check_manifest, bad, 4, 100)


# --- staging ---------------------------------------------------------------------------------------------------------
def test_hash_mismatch_leaves_running_set_and_no_staging():
    root, mgr = _device()
    text, sig, blobs = _release("2.0", NEW)
    sha_a = _sha(NEW["iotlib/a.py"])
    blobs[sha_a] = b"B" + blobs[sha_a][1:]
    m = fwtest.run(mgr.verify_manifest(text, sig))
    e = fwtest.raises(OTAError, fwtest.run, mgr.stage(m, _fetcher(blobs)))
    assert "sha256 mismatch" in str(e)
    assert _is_old(root)
    assert not fsutil.exists(root + "/ota/new") and not fsutil.exists(root + "/ota.json")


def _big_manifest(n=40, spread=False):
    files = [{"path": "iotlib/module_%02d.mpy" % i, "sha256": "%064x" % (i * 7919), "size": 1000 + i} for i in range(n)]
    text = json.dumps({"version": "2.0", "files": files})
    if spread:  # another layout of the same document (MicroPython's json.dumps has no indent)
        text = text.replace(", ", ",\n  ").replace("[", "[\r\n\t").replace("]", " \n]")
    return {"version": "2.0", "files": files}, text


def test_manifest_entries_are_read_one_at_a_time_in_any_json_layout():
    for spread in (False, True):
        doc, text = _big_manifest(5, spread)
        m = ota.Manifest(text.encode(), 48, 64 * 1024)
        assert m["version"] == "2.0" and list(m["files"]) == doc["files"] and list(m["files"]) == doc["files"]
        assert m.total == sum(f["size"] for f in doc["files"])
    odd = b'{"version": "files", "files" : [ {"path":"a.py","sha256":"' + b"b" * 64 + b'","size":1} ] , "x": [1]}'
    m = ota.Manifest(odd, 48, 100)
    assert m["version"] == "files" and [f["path"] for f in m["files"]] == ["a.py"] and m.get("x") == [1]


def test_malformed_manifest_text_is_refused_clearly():
    sha = '"sha256":"' + "a" * 64 + '"'
    for bad in (b'{"version":"1"}', b'{"version":"1","files":[]}', b'{"version":"1","files":{}}',
                b'{"version":"1","files":[1]}', b'{"version":"1","files":[{"path":"a.py",' + sha.encode() + b'}',
                b'{"version":"1","files":[{"path":"a.py",' + sha.encode() + b',"size":1}] trailing',
                b'{"version":"1","files":[{"path":"a.py","x":{},' + sha.encode() + b',"size":1}]}',
                b'{"version":"","files":[{"path":"a.py",' + sha.encode() + b',"size":1}]}',
                b'{"version":"1","files":[{"path":"../a.py",' + sha.encode() + b',"size":1}]}',
                b'{"version":"1","files":[{"path":"a.py",' + sha.encode() + b',"size":1},{"path":"a.py",'
                + sha.encode() + b',"size":1}]}'):
        e = fwtest.raises(OTAError, ota.Manifest, bad, 4, 100)
        assert str(e).startswith("manifest"), (bad, str(e))
    _, text = _big_manifest(5)
    assert "1-4 entries" in str(fwtest.raises(OTAError, ota.Manifest, text.encode(), 4, 64 * 1024))


def test_a_verified_manifest_is_held_once_as_its_signed_bytes():
    # The device must not hold the manifest twice: parsed whole into objects, a 40-file manifest took several times
    # its text on the heap on top of the text itself.
    import gc
    _, text = _big_manifest(40)
    mgr = OTAUpdateManager(fwtest.tmpdir("ota-once"), public_key=_keypair()[2])
    mgr.max_manifest_bytes = 16 * 1024
    sig = _hex(_sign(text.encode()))
    raw = text.encode()
    text = None
    fwtest.run(mgr.verify_manifest(raw, sig))  # warm-up: whatever a first run grows for good (pools, caches)
    mem = getattr(gc, "mem_alloc", None)
    gc.collect()
    before = mem() if mem else 0
    m = fwtest.run(mgr.verify_manifest(raw, sig))
    gc.collect()
    kept = (mem() - before) if mem else 0
    assert len(list(m["files"])) == 40
    assert kept < 1024, "a verified manifest of %d bytes keeps %d more bytes" % (len(raw), kept)


def test_truncated_download_is_refused():
    root, mgr = _device()
    text, sig, blobs = _release("2.0", NEW)
    m = fwtest.run(mgr.verify_manifest(text, sig))
    e = fwtest.raises(OTAError, fwtest.run, mgr.stage(m, _fetcher(blobs, truncate_at=2500)))
    assert "stopped at 2500" in str(e)
    assert _is_old(root) and not fsutil.exists(root + "/ota/new")


def test_oversized_chunk_is_refused():
    root, mgr = _device()
    text, sig, blobs = _release("2.0", NEW)
    m = fwtest.run(mgr.verify_manifest(text, sig))

    async def greedy(sha, offset, length):
        return blobs[sha][offset:offset + length + 1] if len(blobs[sha]) > offset + length else blobs[sha][offset:]
    e = fwtest.raises(OTAError, fwtest.run, mgr.stage(m, greedy))
    assert "more bytes" in str(e)
    assert _is_old(root)


def test_too_little_flash_is_refused_before_downloading():
    root, mgr = _device()
    text, sig, blobs = _release("2.0", NEW)
    m = fwtest.run(mgr.verify_manifest(text, sig))
    mgr.free_bytes = lambda: 100
    calls = []

    async def fetch(sha, offset, length):
        calls.append(sha)
        return blobs[sha][offset:offset + length]
    e = fwtest.raises(OTAError, fwtest.run, mgr.stage(m, fetch))
    assert "not enough flash" in str(e) and calls == []


# --- swap, trial, commit, rollback -----------------------------------------------------------------------------------
def test_install_trial_then_healthy_commits():
    root, mgr = _device()
    _stage_and_install(mgr)
    assert _is_new(root)
    mgr2 = OTAUpdateManager(root, public_key=_keypair()[2])
    info = mgr2.boot()
    assert info["trial"] == "2.0" and info["rolled_back"] is None
    assert _is_new(root)
    assert mgr2.healthy() == "2.0"
    assert mgr2.pending_result() == {"version": "2.0", "status": "installed"}
    assert mgr2.current("0.1.0") == "2.0"
    assert not fsutil.exists(root + "/ota.json") and not fsutil.exists(root + "/ota/old")
    assert OTAUpdateManager(root).boot()["trial"] is None and _is_new(root)


def test_reset_during_trial_rolls_back_to_old_set():
    root, mgr = _device()
    _stage_and_install(mgr)
    assert OTAUpdateManager(root).boot()["trial"] == "2.0"
    info = OTAUpdateManager(root).boot()  # reset before healthy
    assert info["rolled_back"] == "2.0" and info["trial"] is None
    assert _is_old(root)
    res = OTAUpdateManager(root).pending_result()
    assert res["status"] == "rolled_back" and res["running"] == "1.0"
    assert OTAUpdateManager(root).current("1.0") == "1.0"
    assert not fsutil.exists(root + "/ota.json")


class _CutOs:
    """os stand-in whose rename raises (power cut) once `left` renames have happened."""

    def __init__(self, left):
        self.left = left

    def rename(self, a, b):
        if self.left <= 0:
            raise OSError(5)
        self.left -= 1
        os.rename(a, b)

    def __getattr__(self, name):
        return getattr(os, name)


def test_power_cut_at_every_step_of_the_swap_boots_a_complete_set():
    n = 0
    while True:
        root, mgr = _device()
        text, sig, blobs = _release("2.0", NEW)
        m = fwtest.run(mgr.verify_manifest(text, sig))
        fwtest.run(mgr.stage(m, _fetcher(blobs)))
        otaboot.os = _CutOs(n)
        try:
            mgr.install(m)
            finished = True
        except OSError:
            finished = False
        finally:
            otaboot.os = os
        # reset: the next boot completes the swap (every staged file was verified), the set is new and on trial
        info = OTAUpdateManager(root).boot()
        assert info["trial"] == "2.0" and _is_new(root), n
        # and a reset before healthy takes the device back to the complete old set
        OTAUpdateManager(root).boot()
        assert _is_old(root), n
        if finished:
            break
        n += 1
    assert n >= 5


def test_power_cut_during_rollback_resumes_it():
    n = 0
    while True:
        root, mgr = _device()
        _stage_and_install(mgr)
        OTAUpdateManager(root).boot()
        otaboot.os = _CutOs(n)
        try:
            OTAUpdateManager(root).boot()
            finished = True
        except OSError:
            finished = False
        finally:
            otaboot.os = os
        info = OTAUpdateManager(root).boot()
        assert _is_old(root), n
        assert info["trial"] is None
        if finished:
            break
        n += 1
    assert n >= 2


# --- safe mode --------------------------------------------------------------------------------------------------------
def test_boot_counter_enters_safe_mode_and_healthy_clears_it():
    root, mgr = _device()
    for i in range(OTAUpdateManager.safe_mode_after):
        info = OTAUpdateManager(root).boot()
        assert not info["safe_mode"] and info["boots"] == i + 1
    m = OTAUpdateManager(root)
    assert m.boot()["safe_mode"]
    m.healthy()
    assert OTAUpdateManager(root).boot()["boots"] == 1
    for i in range(OTAUpdateManager.safe_mode_after):
        OTAUpdateManager(root).boot()
    m = OTAUpdateManager(root)
    assert m.boot()["safe_mode"]
    m.stable()  # ran long enough: the next boot starts counting again
    assert OTAUpdateManager(root).boot() == {"boots": 1, "safe_mode": False, "trial": None, "rolled_back": None}


# --- over HTTP (a real server on 127.0.0.1) ----------------------------------------------------------------------------
def test_update_over_http_from_a_real_server():
    from iotlib.compat import asyncio
    from iotlib.http import HTTPClient
    root, mgr = _device()
    text, sig, blobs = _release("2.0", NEW)
    seen = []

    async def handle(reader, writer):
        line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = line.split(" ")[1]
        seen.append(path)
        extra = b""
        if path == "/ota":
            body = json.dumps({"version": "2.0", "manifest_url": base + "/manifest", "files_url": base + "/files"})
        elif path == "/manifest?raw=1":  # the manifest's exact bytes, the signature in a header
            body, extra = text, b"X-Manifest-Signature: " + sig.encode() + b"\r\n"
        else:
            sha, q = path[len("/files/"):].split("?")
            args = dict(kv.split("=") for kv in q.split("&"))
            body = blobs[sha][int(args["offset"]):int(args["offset"]) + int(args["length"])]
        if isinstance(body, str):
            body = body.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body) + extra + b"\r\n"
                     + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def go():
        srv = None
        for port in range(18650, 18690):
            try:
                srv = await asyncio.start_server(handle, "127.0.0.1", port)
                break
            except OSError:
                pass
        global base
        base = "http://127.0.0.1:%d" % port
        try:
            http = HTTPClient()
            from iotlib.otaguard import ota_offer
            offer = await ota_offer(http, base + "/ota", {})
            return await mgr.update(http, offer, {}, running="1.0")
        finally:
            srv.close()
            await srv.wait_closed()
    assert fwtest.run(go()) == "2.0"
    assert _is_new(root)
    assert len([p for p in seen if p.startswith("/files/")]) == 1 + 6 + 1  # 1000-byte chunks
    assert OTAUpdateManager(root).boot()["trial"] == "2.0"

