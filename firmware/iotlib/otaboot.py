# The part of OTA every boot needs (docs/ota.md): finish an interrupted swap or rollback, trial/commit/rollback, the
# safe-mode boot counter and the result report. Downloading and verifying an update (iotlib.ota,
# ~10 KB of heap as .mpy) is imported only when the control plane offers one.
# The marker file ota.json (temp + rename) records where a swap is, so a reset at any point resumes it: a "swap"
# marker is finished forward (every staged file was complete and verified before the marker was written), a
# "rollback" marker is finished back. The first boot of the new set is a trial: reaching healthy commits it, a reset
# before that rolls it back.
import os
from iotlib import fsutil
from iotlib.compat import asyncio


class OTABoot:
    #: seconds a trial boot has to reach healthy (registered + config applied) before it is rolled back
    #: (Device._trial_watch)
    healthy_within_s = 180
    #: boots in a row that never reached healthy (nor ran stable_after_s) before the device starts in safe mode
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

    def _p(self, rel, sub=None):
        base = self.root + "/" + sub if sub else self.root
        return (base + "/" + rel) if base else rel

    # --- boot ---------------------------------------------------------------------------------------------------------
    def boot(self):
        """Call first at every boot: finishes an interrupted swap or rollback, counts trial and unhealthy boots.
        Returns {"boots", "safe_mode", "trial", "rolled_back"}."""
        fsutil.makedirs(self.dir)
        self.boots = fsutil.bump_counter(self._p("boots.json", "ota"))
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
        self.boots = fsutil.bump_counter(self._p("boots.json", "ota"), reset=True)  # no flash write when already 0

    def healthy(self):
        """The device registered and applied its config: clear the boot counter and commit a trial update."""
        self.stable()
        version = self.trial  # the device's boot guard passes on what boot() found
        if version is None:
            # the marker lists every file of the update (1K+ for a whole bundle): read only when needed, since a
            # trial becomes healthy at the peak of its boot, when the heap has no block that large to spare
            m = fsutil.read_json(self.marker_path) or {}
            version = m.get("version") if m.get("state") == "trial" else None
        if version is None:
            return None
        fsutil.write_json_atomic(self._p("result.json", "ota"), {"version": version, "status": "installed"})
        fsutil.write_json_atomic(self._p("current.json", "ota"), {"version": version})
        fsutil.remove(self.marker_path)
        self.trial = None
        self._clean()
        return version

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

    # --- control plane ------------------------------------------------------------------------------------------------
    def failed(self, version, reason, running=None):
        """An offered update could not be installed (refused, download failed, out of memory): nothing was swapped,
        the device runs `running` on. Recorded like an install result and reported at the next contact."""
        fsutil.write_json_atomic(self._p("result.json", "ota"), {"version": version, "status": "failed",
                                                                "reason": reason[:256], "running": running})

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
