# The device's side of OTA and its boot guard (docs/ota.md; the states: docs/firmware-design.md, "Device states"):
# the safe-mode boot counter, the trial of an installed update (committed at healthy, rolled back when healthy does
# not come), the OTA check (a result to report, an offer to accept) and the update boot that installs an accepted
# offer. Device imports this module only for those moments and drops it again (Device._guard), so its code is off
# the heap while the device does its normal work; iotlib.otaboot (swap, trial, rollback) is loaded only where an
# update left something on flash, iotlib.ota and ed25519 only in an update boot.
from iotlib.compat import asyncio, ticks_ms, ticks_diff, urandom
from iotlib import fsutil, __version__
from iotlib import log as _logmod

_log = _logmod.get("device")

#: The safe-mode boot counter, the file OTABoot keeps too.
BOOTS = "ota/boots.json"
#: An accepted offer whose download transport errors cut: {"version", "tries", "reason"} (retried, then failed).
RETRY = "ota/retry.json"
_RESULT = "ota/result.json"


def unload(*names):
    # OTA code runs rarely: drop its modules so their bytecode (kilobytes of a 192 KB heap) can be collected; a call
    # in progress keeps what it runs
    import sys
    import iotlib
    for name in names:
        sys.modules.pop(name, None)
        try:
            delattr(iotlib, name.rsplit(".", 1)[1])
        except (AttributeError, KeyError):  # not loaded: MicroPython raises KeyError, CPython AttributeError
            pass


def _otaboot(dev):
    from iotlib.otaboot import OTABoot
    unload("iotlib.otaboot")  # the object keeps its class; nothing else does
    ob = OTABoot(dev.flash("").rstrip("/"), public_key=dev.ota_public_key)
    ob.safe_mode_after = dev.safe_mode_after
    return ob


def in_use(dev):
    # otaboot is loaded at boot only where it has something to do: what an update left on flash (a
    # swap/trial/rollback marker, a result to report, staged or backed-up files). Otherwise its code and ≈ 26
    # interned names never load (the names would stay in the pool for good), OTA key or not: checking for an
    # offer is one GET (ota_offer).
    for rel in ("ota.json", _RESULT, "ota/new", "ota/old"):
        if fsutil.exists(dev.flash(rel)):
            return True
    return False


# --- the boot guard ---------------------------------------------------------------------------------------------------
def boot(dev):
    """First at every boot: finish an interrupted update swap / roll a failed trial back, count boots for safe mode.
    Sets dev.trial (the version on trial this boot, or None), dev.safe_mode and dev.ota_boot."""
    dev._ota_used = in_use(dev)
    if dev._ota_used:
        ob = _otaboot(dev)
        r = ob.boot()
        dev._trial_s = ob.healthy_within_s
    else:  # OTA off: only the safe-mode counter (the file OTABoot keeps), without loading otaboot at all
        fsutil.makedirs(dev.flash("ota"))
        n = fsutil.bump_counter(dev.flash(BOOTS))
        r = {"boots": n, "safe_mode": n > dev.safe_mode_after, "trial": None, "rolled_back": None}
    dev.ota_boot = r
    dev.trial = r["trial"]
    dev.safe_mode = r["safe_mode"]


def stable(dev):
    """The device ran stable_after_s: this boot no longer counts towards safe mode."""
    if dev._ota_used:
        _otaboot(dev).stable()
    else:
        fsutil.bump_counter(dev.flash(BOOTS), reset=True)


def healthy(dev):
    """Registered and configured: clear the boot counter, commit a trial."""
    if not dev._ota_used:
        stable(dev)
        return
    ob = _otaboot(dev)
    ob.trial = dev.trial
    committed = ob.healthy()  # also clears the counter
    if committed:
        _log.info("ota committed", version=committed)
    dev.trial = None


def trial_failed(dev):
    """The trial did not become healthy within its time (Device._trial_watch): roll it back and reset."""
    _otaboot(dev).rollback("not healthy within %d s" % dev._trial_s)
    _log.error("ota trial failed: rolled back, resetting")
    from iotlib import hal
    hal.reset()


# --- the check in normal work -----------------------------------------------------------------------------------------
async def ota_offer(http, url, headers):
    """The control plane's OTA offer {"version", "manifest_url", "files_url"}, or None (204)."""
    r = await http.request("GET", url, headers=headers)
    if r.status == 204:
        return None
    if r.status != 200:
        raise OSError("ota check: HTTP %d" % r.status)
    offer = r.json()
    if not isinstance(offer, dict) or not offer.get("manifest_url") or not offer.get("files_url"):
        raise OSError("ota check: offer lacks manifest_url/files_url")
    return offer


def _retry_wait(dev, version):
    # seconds this boot still waits before it accepts an offer whose download was cut before: ota_retry_s, doubled
    # per try, spread over half..all of it (a fleet cut by one restart must not come back together)
    r = fsutil.read_json(dev.flash(RETRY))
    if not isinstance(r, dict) or r.get("version") != version or not isinstance(r.get("tries"), int):
        return 0
    wait = dev.ota_retry_s * (1 << min(r["tries"] - 1, 6)) * (128 + urandom(1)[0] // 2) // 255
    return wait - ticks_diff(ticks_ms(), dev.started_ms) // 1000


async def check(dev, url):
    """One OTA check: report a recorded result, then ask for an offer and accept it by resetting into an update boot.
    Returns the seconds after which to check again when an accepted offer has to wait (a cut download's backoff),
    else None."""
    hdr = dev.auth.auth_header()
    offer = failed = None
    try:
        if fsutil.exists(dev.flash(_RESULT)):  # an install, rollback or failure to report
            await _otaboot(dev).send_result(dev.http, url, hdr)
        if dev.ota_public_key is not None:
            offer = await ota_offer(dev.http, url, hdr)
        if offer:
            wait = _retry_wait(dev, offer.get("version"))
            if wait > 0:
                _log.info("ota update: retrying a cut download later", version=offer.get("version"), wait_s=wait)
                return wait
            # installed by an update boot (update_boot): with nothing else loaded, an update never needs more heap
            # than the device's normal work
            fsutil.write_json_atomic(dev.flash(dev.offer_file), offer)
            _log.info("ota update: resetting into an update boot", version=offer.get("version"))
            await dev.reboot()
    except Exception as e:  # HTTPError, OSError, MemoryError: nothing was swapped
        failed = _logmod.exc_summary(e)
        if isinstance(e, MemoryError):
            from iotlib import metrics
            metrics.memory_error("ota")
    if failed:
        _log.warning("ota failed", reason=failed)
        if offer and isinstance(offer.get("version"), str):
            # reported at the next contact (ota status shows it); the control plane then stops offering this
            # release until it is assigned again, instead of the device failing on it for ever
            try:
                ob = _otaboot(dev)
                ob.failed(offer["version"], failed, ob.current(__version__))
            except (OSError, MemoryError) as e:
                _log.warning("ota result not recorded", reason=_logmod.exc_summary(e))
            dev._ota_wake.set()  # report it now, not at the next periodic check
    return None


# --- the update boot --------------------------------------------------------------------------------------------------
def _transient(e):
    # a transport failure (the network, the control plane restarting, busy or behind a proxy that lost it: OSError,
    # HTTPError, a 5xx/429, which iotlib.ota raises as OSError) says nothing about the release: try it again later.
    # A refused release (bad signature or hash, a 4xx, too little flash) and a MemoryError fail it.
    from iotlib.http import HTTPError
    from iotlib.auth import AuthError
    if isinstance(e, AuthError):  # registration answered: 401/403 refuse this device, anything else is transient
        return getattr(e, "status", 0) not in (401, 403)
    return isinstance(e, (OSError, HTTPError))


async def update_boot(dev):
    """The boot after an offer was accepted: install it with nothing else loaded (no local API, no domain, no managers
    but the network, the HTTP client and registration), so an update never needs more heap than the device's normal
    work. The offer is removed first: a reset during it boots back to normal work. A transport error is retried
    (Device.ota_attempts in this boot, retry_min_s apart and doubling); when every attempt is cut, normal work accepts
    the offer again after Device.ota_retry_s (doubling), and after Device.ota_retries such boots it is failed. Ends in
    a reset: into the trial when the update installed, else into normal work with the failure recorded and reported
    at the next contact (`picoiot ota status`)."""
    from iotlib import hal
    from iotlib.net import NetworkManager
    from iotlib.http import HTTPClient
    from iotlib.auth import AuthManager
    from iotlib.ota import OTAUpdateManager  # the code first, packed at one end of the heap, then the objects
    _logmod.set_level("info")
    offer = fsutil.read_json(dev.flash(dev.offer_file))
    fsutil.remove(dev.flash(dev.offer_file))
    ob = OTAUpdateManager(dev.flash("").rstrip("/"), public_key=dev.ota_public_key)
    running = ob.current(__version__)
    v = offer.get("version") if isinstance(offer, dict) else None
    why = None
    delay = dev.retry_min_s
    for attempt in range(dev.ota_attempts):
        if attempt:
            await asyncio.sleep(delay * (128 + urandom(1)[0] // 2) / 255)
            delay *= 2
        try:
            if dev.net is None:
                dev.net = NetworkManager(dev.wifi_ssid, dev._wifi_password, networks=dev.wifi_networks)
                await dev.net.connect()
                dev.http = HTTPClient(cadata=dev.cadata)
                dev.auth = AuthManager(dev.device_id, dev._device_key, sd_url=dev.sd_url, namespace=dev.namespace,
                                       info=dev._reg_info())
            await dev.auth.ensure_token(dev.http)
            v = await ob.update(dev.http, offer, dev.auth.auth_header(), running=running)
            fsutil.remove(dev.flash(RETRY))
            _log.info("ota installed, resetting into trial", version=v)
            hal.reset()
        except Exception as e:  # OTAError, HTTPError, OSError, MemoryError: nothing was swapped
            why = _logmod.exc_summary(e)
            if not _transient(e):
                _log.warning("ota failed", reason=why)
                break
            _log.warning("ota download cut", reason=why, attempt=attempt + 1, of=dev.ota_attempts)
    else:  # every attempt cut by a transport error: normal work tries again later, up to ota_retries boots
        r = fsutil.read_json(dev.flash(RETRY))
        tries = (r["tries"] if isinstance(r, dict) and r.get("version") == v and isinstance(r.get("tries"), int)
                 else 0) + 1
        if tries < dev.ota_retries:
            fsutil.write_json_atomic(dev.flash(RETRY), {"version": v, "tries": tries, "reason": why[:256]})
            hal.reset()
        why = "download cut %d times, last: %s" % (tries * dev.ota_attempts, why)
        _log.warning("ota failed", reason=why)
    fsutil.remove(dev.flash(RETRY))
    if isinstance(v, str):
        ob.failed(v, why, running)
    hal.reset()
