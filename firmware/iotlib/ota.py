# Over-the-air updates (docs/ota.md): fetch, verify and stage an update, then hand it to
# OTABoot.install (iotlib/otaboot.py: the swap, trial, rollback and safe-mode counter every boot needs).
# An update is a signed manifest {version, files[{path, sha256, size}]}. The device verifies the Ed25519 signature
# over the manifest's exact bytes before parsing it, then downloads every file into a staging dir (chunked, sha256
# and size checked). Imported only when the control plane offers an update (~10 KB of heap as .mpy).
# Memory: an update must fit in the heap the device's normal work needs. The manifest is held once, as the bytes that
# were signed (fetched raw, hashed in place); its file entries are parsed one at a time when needed, never as a whole
# document of objects; a file goes from the network to flash one chunk at a time.
import os
import json
from iotlib import fsutil
from iotlib.compat import asyncio
from iotlib.otaboot import OTABoot, _makedirs_for

try:
    import hashlib
except ImportError:  # pragma: no cover
    import uhashlib as hashlib

try:
    from binascii import hexlify as _hexlify
except ImportError:  # pragma: no cover
    _hexlify = None

_PATH_OK = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/"
_HEX = "0123456789abcdef"


class OTAError(Exception):
    """An update was refused or failed; str(e) says why. Nothing on flash was changed outside the staging dir."""


def _refused(what, status):
    # 5xx and 429: the control plane is restarting or busy, the release may be fine: OSError, a transport error the
    # update boot retries (iotlib.otaguard). Any other status refuses the release: OTAError.
    return (OSError if status >= 500 or status == 429 else OTAError)("%s: HTTP %d" % (what, status))


def _hex(b):
    return _hexlify(b).decode() if _hexlify else b.hex()


def _check_version(m):
    if not isinstance(m, dict) or not isinstance(m.get("version"), str) or not 0 < len(m["version"]) <= 32:
        raise OTAError("manifest: version must be a string of 1-32 chars")


def _check_entry(f, seen, max_file_bytes):
    if not isinstance(f, dict):
        raise OTAError("manifest: file entry is not an object")
    p, h, n = f.get("path"), f.get("sha256"), f.get("size")
    if (not isinstance(p, str) or not 0 < len(p) <= 64 or p[0] == "/" or p[-1] == "/" or ".." in p
            or "//" in p or p.startswith("ota") or any(c not in _PATH_OK for c in p) or p in seen):
        raise OTAError("manifest: bad path %r" % (p,))
    if not isinstance(h, str) or len(h) != 64 or any(c not in _HEX for c in h):
        raise OTAError("manifest: bad sha256 for " + p)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= max_file_bytes:
        raise OTAError("manifest: size of %s must be 0-%d" % (p, max_file_bytes))
    seen.add(p)


def check_manifest(m, max_files, max_file_bytes):
    """Raise OTAError unless m is a well-formed manifest dict; returns it."""
    _check_version(m)
    files = m.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= max_files:
        raise OTAError("manifest: files must be a list of 1-%d entries" % max_files)
    seen = set()
    for f in files:
        _check_entry(f, seen, max_file_bytes)
    return m


_WS = b" \t\r\n"


def _skip_ws(t, i):
    while t[i] in _WS:
        i += 1
    return i


def _entry_spans(t, i, end=None):
    """(start, stop) of each object in the JSON array whose "[" is at t[i]; end[0] = the index of its "]". A file entry
    is a flat object (its strings hold no braces: paths and hashes are checked against their alphabets later)."""
    i = _skip_ws(t, i + 1)
    if t[i] != 0x5D:  # "]": an empty list
        while True:
            if t[i] != 0x7B:  # "{"
                raise OTAError("manifest: files must be a list of objects")
            j = t.find(b"}", i)
            if j < 0:
                raise OTAError("manifest: unterminated file entry")
            yield i, j + 1
            i = _skip_ws(t, j + 1)
            if t[i] == 0x5D:
                break
            if t[i] != 0x2C:  # ","
                raise OTAError("manifest: files must be a list of objects")
            i = _skip_ws(t, i + 1)
    if end is not None:
        end[0] = i


class Manifest:
    """A verified manifest held once, as the bytes that were signed: the file entries are parsed one at a time when
    `m["files"]` is iterated (each a small dict, dropped after use). Checked whole on construction (OTAError)."""

    def __init__(self, text, max_files, max_file_bytes):
        self.text = text
        try:
            k = -1
            while True:  # the key "files" (a string "files" elsewhere, e.g. as the version, is not followed by ":")
                k = text.find(b'"files"', k + 1)
                if k < 0:
                    raise OTAError("manifest: files must be a list of 1-%d entries" % max_files)
                i = _skip_ws(text, k + 7)
                if text[i] == 0x3A:  # ":"
                    break
            self._lb = i = _skip_ws(text, i + 1)
            if text[i] != 0x5B:  # "["
                raise OTAError("manifest: files must be a list of 1-%d entries" % max_files)
            end = [None]
            seen = set()
            self.total = n = 0
            for a, b in _entry_spans(text, i, end):
                n += 1
                if n > max_files:
                    break
                f = self._entry(a, b)
                _check_entry(f, seen, max_file_bytes)
                self.total += f["size"]
            seen = None
            if not 0 < n <= max_files:
                raise OTAError("manifest: files must be a list of 1-%d entries" % max_files)
            self._rb = end[0]
            top = json.loads(text[:self._lb + 1] + text[self._rb:])  # the document without its file entries
        except (IndexError, ValueError):
            raise OTAError("manifest is not JSON")
        _check_version(top)
        top.pop("files", None)
        self.top = top

    def _entry(self, a, b):
        try:
            return json.loads(self.text[a:b])
        except ValueError:
            raise OTAError("manifest: bad file entry")

    def files(self):
        for a, b in _entry_spans(self.text, self._lb):
            yield self._entry(a, b)

    def __getitem__(self, key):
        return self.files() if key == "files" else self.top[key]

    def __setitem__(self, key, value):
        self.top[key] = value

    def get(self, key, default=None):
        return self.top.get(key, default)


class OTAUpdateManager(OTABoot):
    """OTABoot plus fetching, verifying and staging an update."""
    #: largest file an update may carry (bytes; the control plane's request-body limit)
    max_file_bytes = 64 * 1024
    #: most files in one update
    max_files = 48
    #: largest manifest document accepted (bytes)
    max_manifest_bytes = 8 * 1024
    #: bytes asked for per download request (each is its own short connection: one outbound connection at a time).
    #: Small: a chunk needs one contiguous block (twice, while the stream reader joins its reads), and a device that
    #: has run a while has many small holes and few large ones.
    chunk_bytes = 1024
    #: flash that must stay free beyond the staged files and their backups
    free_margin_bytes = 32 * 1024

    def free_bytes(self):
        try:
            st = os.statvfs(self.root or "/")
            return st[0] * st[4]
        except (AttributeError, OSError):
            return None

    async def verify_manifest(self, text, signature_hex, feed=None):
        """Parse and check a manifest whose exact bytes `text` are signed; raises OTAError."""
        from iotlib import ed25519
        if self.public_key is None or len(self.public_key) != 32:
            raise OTAError("no OTA public key configured")
        if isinstance(text, str):
            text = text.encode()
        if len(text) > self.max_manifest_bytes:
            raise OTAError("manifest larger than %d bytes" % self.max_manifest_bytes)
        try:
            sig = bytes(int(signature_hex[i:i + 2], 16) for i in range(0, len(signature_hex), 2))
        except (TypeError, ValueError):
            raise OTAError("signature is not hex")
        out = [False]
        for _ in ed25519.verify_steps(self.public_key, text, sig, out):
            if feed:
                feed()
            await asyncio.sleep(0)
        if not out[0]:
            raise OTAError("bad manifest signature")
        return Manifest(text, self.max_files, self.max_file_bytes)

    async def stage(self, manifest, fetch, feed=None):
        """Download every file with `await fetch(sha256, offset, length)` → bytes into ota/new, checking size and
        sha256. Raises OTAError (staging removed) on any mismatch, short read or too little flash."""
        total = manifest.total if isinstance(manifest, Manifest) else sum(f["size"] for f in manifest["files"])
        free = self.free_bytes()
        if free is not None and free < 2 * total + self.free_margin_bytes:
            raise OTAError("not enough flash: %d bytes free, %d needed" % (free, 2 * total + self.free_margin_bytes))
        self._clean()
        try:
            for f in manifest["files"]:
                dst = self._p(f["path"], "ota/new")
                _makedirs_for(dst)
                h = hashlib.sha256()
                got = 0
                with open(dst, "wb") as out:
                    while got < f["size"]:
                        want = min(self.chunk_bytes, f["size"] - got)
                        data = await fetch(f["sha256"], got, want)
                        if not data:
                            raise OTAError("download of %s stopped at %d of %d bytes" % (f["path"], got, f["size"]))
                        if len(data) > want:
                            raise OTAError("download of %s: more bytes than asked for" % f["path"])
                        h.update(data)
                        out.write(data)
                        got += len(data)
                        if feed:
                            feed()
                        await asyncio.sleep(0)
                if _hex(h.digest()) != f["sha256"]:
                    raise OTAError("sha256 mismatch for " + f["path"])
        except BaseException:
            self._clean()
            raise

    # --- control plane ------------------------------------------------------------------------------------------------
    async def update(self, http, offer, headers, running=None, feed=None):
        """Fetch, verify, stage and install the offered release. Returns its version; raises OTAError."""
        # raw: the manifest's exact bytes as the body, its signature in a header (not both inside a JSON document that
        # would have to be parsed into a second copy)
        r = await http.request("GET", offer["manifest_url"] + "?raw=1", headers=headers)
        if r.status != 200:
            raise _refused("manifest", r.status)
        sig = r.headers.get("x-manifest-signature")
        if not sig:
            raise OTAError("manifest: answer lacks its signature")
        text = r.body
        r = None
        m = await self.verify_manifest(text, sig, feed)
        text = None
        base = offer["files_url"]

        async def fetch(sha, offset, length):
            fr = await http.request("GET", "%s/%s?offset=%d&length=%d" % (base, sha, offset, length), headers=headers)
            if fr.status != 200:
                raise _refused("file " + sha[:12], fr.status)
            return fr.body

        await self.stage(m, fetch, feed)
        m["previous"] = running
        self.install(m)
        return m["version"]
