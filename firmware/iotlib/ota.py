# Over-the-air updates (ARCHITECTURE §3 "OTA"; docs/ota.md) and the safe-mode boot counter.
# An update is a signed manifest {version, files[{path, sha256, size}]}. The device verifies the Ed25519 signature
# over the manifest's exact bytes, downloads every file into a staging dir (chunked, sha256 and size checked), then
# swaps: each old file is renamed into a backup dir, each staged file renamed into place. The marker file ota.json
# (temp + rename) records where the swap is, so a reset at any point resumes it: a "swap" marker is finished forward
# (every staged file was complete and verified before the marker was written), a "rollback" marker is finished back.
# The first boot of the new set is a trial: reaching healthy commits it, a reset before that rolls it back.
import os
import json
from iotlib import fsutil
from iotlib.compat import asyncio

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


def _hex(b):
    return _hexlify(b).decode() if _hexlify else b.hex()


def check_manifest(m, max_files, max_file_bytes):
    """Raise OTAError unless m is a well-formed manifest dict; returns it."""
    if not isinstance(m, dict) or not isinstance(m.get("version"), str) or not 0 < len(m["version"]) <= 32:
        raise OTAError("manifest: version must be a string of 1-32 chars")
    files = m.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= max_files:
        raise OTAError("manifest: files must be a list of 1-%d entries" % max_files)
    seen = set()
    for f in files:
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
    return m


class OTAUpdateManager:
    #: largest file an update may carry (bytes)
    max_file_bytes = 128 * 1024
    #: most files in one update
    max_files = 48
    #: largest manifest document accepted (bytes)
    max_manifest_bytes = 8 * 1024
    #: bytes asked for per download request (each is its own short connection: one outbound connection at a time)
    chunk_bytes = 4096
    #: flash that must stay free beyond the staged files and their backups
    free_margin_bytes = 32 * 1024
    #: seconds a trial boot has to reach healthy (registered + config applied) before it is rolled back
    healthy_within_s = 180
    #: boots in a row that never reached healthy before the device starts in safe mode
    safe_mode_after = 3

    def __init__(self, root, public_key=None):
        """root: the flash dir holding the code (files are relative to it). public_key: 32 bytes or 64 hex chars."""
        self.root = root.rstrip("/")
        if isinstance(public_key, str):
            public_key = bytes(int(public_key[i:i + 2], 16) for i in range(0, len(public_key), 2))
        self.public_key = public_key
        self.dir = self._p("ota")
        self.marker_path = self._p("ota.json")
        self.trial = None  # the version on trial this boot, or None
        self.boots = 0
        self.safe_mode = False
        self.last_error = None

    def _p(self, rel, sub=None):
        base = self.root + "/" + sub if sub else self.root
        return (base + "/" + rel) if base else rel

    # --- boot ---------------------------------------------------------------------------------------------------------
    def boot(self):
        """Call first at every boot: finishes an interrupted swap or rollback, counts trial and unhealthy boots.
        Returns {"boots", "safe_mode", "trial", "rolled_back"}."""
        fsutil.makedirs(self.dir)
        bc = fsutil.read_json(self._p("boots.json", "ota"), {}) or {}
        self.boots = (bc.get("n", 0) if isinstance(bc.get("n"), int) else 0) + 1
        fsutil.write_json_atomic(self._p("boots.json", "ota"), {"n": self.boots})
        self.safe_mode = self.boots > self.safe_mode_after
        rolled = None
        m = fsutil.read_json(self.marker_path)
        if m is None:
            self._clean()
        else:
            st = m.get("state")
            if st == "swap":
                self._swap(m)
                m["state"], m["trial_boots"] = "trial", 0
            if m.get("state") == "trial":
                m["trial_boots"] = m.get("trial_boots", 0) + 1
                if m["trial_boots"] > 1:  # the previous trial boot reset before it reached healthy
                    self.rollback("reset before healthy", m)
                    rolled = m.get("version")
                else:
                    fsutil.write_json_atomic(self.marker_path, m)
                    self.trial = m.get("version")
            elif st == "rollback":
                self.rollback(m.get("reason") or "interrupted rollback", m)
                rolled = m.get("version")
        return {"boots": self.boots, "safe_mode": self.safe_mode, "trial": self.trial, "rolled_back": rolled}

    def stable(self):
        """The device ran long enough not to be in a crash loop: clear the boot counter (a control plane outage must
        not send a working device into safe mode; only a trial needs healthy)."""
        if self.boots:
            fsutil.write_json_atomic(self._p("boots.json", "ota"), {"n": 0})
        self.boots = 0

    def healthy(self):
        """The device registered and applied its config: clear the boot counter and commit a trial update."""
        self.stable()
        if self.trial is None:
            return None
        m = fsutil.read_json(self.marker_path) or {}
        version = self.trial
        fsutil.write_json_atomic(self._p("result.json", "ota"), {"version": version, "status": "installed"})
        fsutil.write_json_atomic(self._p("current.json", "ota"), {"version": version})
        fsutil.remove(self.marker_path)
        self.trial = None
        self._clean()
        return m.get("version", version)

    def rollback(self, reason, m=None):
        """Put every file of the last swap back as it was before it (resumable), record the result."""
        m = m or fsutil.read_json(self.marker_path)
        if not m:
            return False
        if m.get("state") != "rollback":
            m["state"], m["reason"] = "rollback", reason
            fsutil.write_json_atomic(self.marker_path, m)
        created = m.get("created") or []
        for p in m.get("files") or []:
            target, old = self._p(p), self._p(p, "ota/old")
            if fsutil.exists(old):
                fsutil.remove(target)
                os.rename(old, target)
            elif p in created:
                fsutil.remove(target)
        fsutil.write_json_atomic(self._p("result.json", "ota"),
                                 {"version": m.get("version"), "status": "rolled_back", "reason": reason,
                                  "running": m.get("previous")})
        fsutil.remove(self.marker_path)
        self.trial = None
        self._clean()
        return True

    async def trial_watch(self, is_healthy, reset, poll_s=1):
        """While a trial is on, wait up to healthy_within_s for is_healthy(); then commit, or roll back and reset()."""
        waited = 0
        while self.trial is not None:
            if is_healthy():
                self.healthy()
                return True
            if waited >= self.healthy_within_s:
                self.rollback("not healthy within %d s" % self.healthy_within_s)
                reset()
                return False
            await asyncio.sleep(poll_s)
            waited += poll_s
        return None

    # --- staging and swap ---------------------------------------------------------------------------------------------
    def _clean(self):
        for sub in ("ota/new", "ota/old"):
            _rmtree(self._p(sub))

    def _swap(self, m):
        # Per file: target → ota/old/<path> (if there was one), ota/new/<path> → target. Each step is one rename and
        # the state is readable from what exists, so a rerun after a reset continues where it stopped.
        for p in m["files"]:
            new, target, old = self._p(p, "ota/new"), self._p(p), self._p(p, "ota/old")
            if not fsutil.exists(new):
                continue  # already moved
            if fsutil.exists(target) and not fsutil.exists(old):
                _makedirs_for(old)
                os.rename(target, old)
            _makedirs_for(target)
            fsutil.remove(target)  # only there if it was an earlier moved file rewritten: never the backup
            os.rename(new, target)

    def install(self, manifest):
        """Swap the fully staged, verified files of manifest in. The new set runs from the next boot (on trial)."""
        created = [f["path"] for f in manifest["files"] if not fsutil.exists(self._p(f["path"]))]
        m = {"state": "swap", "version": manifest["version"], "previous": manifest.get("previous"),
             "files": [f["path"] for f in manifest["files"]], "created": created}
        fsutil.write_json_atomic(self.marker_path, m)  # from here on a reset finishes the swap
        self._swap(m)
        m["state"], m["trial_boots"] = "trial", 0
        fsutil.write_json_atomic(self.marker_path, m)

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
        try:
            m = json.loads(text)
        except ValueError:
            raise OTAError("manifest is not JSON")
        return check_manifest(m, self.max_files, self.max_file_bytes)

    async def stage(self, manifest, fetch, feed=None):
        """Download every file with `await fetch(sha256, offset, length)` → bytes into ota/new, checking size and
        sha256. Raises OTAError (staging removed) on any mismatch, short read or too little flash."""
        total = sum(f["size"] for f in manifest["files"])
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
    async def check(self, http, url, headers):
        """The server's offer {"version", "manifest_url", "files_url"} or None (204)."""
        r = await http.request("GET", url, headers=headers)
        if r.status == 204:
            return None
        if r.status != 200:
            raise OTAError("ota check: HTTP %d" % r.status)
        offer = r.json()
        if not isinstance(offer, dict) or not offer.get("manifest_url") or not offer.get("files_url"):
            raise OTAError("ota check: offer lacks manifest_url/files_url")
        return offer

    async def update(self, http, offer, headers, running=None, feed=None):
        """Fetch, verify, stage and install the offered release. Returns its version; raises OTAError."""
        r = await http.request("GET", offer["manifest_url"], headers=headers)
        if r.status != 200:
            raise OTAError("manifest: HTTP %d" % r.status)
        doc = r.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), str):
            raise OTAError("manifest: answer lacks the manifest text")
        m = await self.verify_manifest(doc["manifest"], doc.get("signature") or "", feed)
        base = offer["files_url"]

        async def fetch(sha, offset, length):
            fr = await http.request("GET", "%s/%s?offset=%d&length=%d" % (base, sha, offset, length), headers=headers)
            if fr.status != 200:
                raise OTAError("file %s: HTTP %d" % (sha[:12], fr.status))
            return fr.body

        await self.stage(m, fetch, feed)
        m["previous"] = running
        self.install(m)
        return m["version"]

    def current(self, default=None):
        """Version of the last committed update, else default (the firmware's own)."""
        return (fsutil.read_json(self._p("current.json", "ota")) or {}).get("version") or default

    def pending_result(self):
        return fsutil.read_json(self._p("result.json", "ota"))

    async def send_result(self, http, url, headers):
        """POST the recorded install/rollback result to <ota>/report; forgotten once the server took it."""
        res = self.pending_result()
        if not res:
            return False
        r = await http.request("POST", url + "/report", json=res, headers=headers)
        if r.status in (200, 404, 422):  # 4xx: the server will never take it (release deleted): drop it
            fsutil.remove(self._p("result.json", "ota"))
            return r.status == 200
        return False


def _makedirs_for(path):
    if "/" in path:
        fsutil.makedirs(path.rsplit("/", 1)[0])


def _rmtree(path):
    if not fsutil.exists(path):
        return
    if fsutil.is_dir(path):
        for name in os.listdir(path):
            _rmtree(path + "/" + name)
        os.rmdir(path)
    else:
        os.remove(path)
