# The board's entry point: MicroPython runs /main.py after boot. It reads /settings.json (iotlib.settings), builds the
# controller the file names with the seed's constructor arguments and runs `await controller.main()`.
# A missing, partial or invalid settings file prints one line naming the field and leaves the board idle and safe:
# Wi-Fi off, relay pins back to inputs (their reset state, which relay modules read as off), main.py returns, the
# REPL stays reachable over USB for `picoiot deploy` to fix it. No reset, so no crash loop.
# Under the unix port (simulation) the same file runs from a flash directory:
#   MICROPYPATH=FLASH_DIR micropython -X heapsize=192K FLASH_DIR/main.py [FLASH_DIR/settings.json]
# The simulated board's flash is the directory holding the settings file (or the file's "sim": {"flash_dir"}).
import sys

SETTINGS = "settings.json"
#: exit status under the unix port when the settings are unusable (sysexits' EX_CONFIG)
EXIT_CONFIG = 78
#: the log file on flash takes at most this share of the free flash (1/8), and stays off below _MIN_LOG_FLASH bytes
_LOG_SHARE = 8
_MIN_LOG_FLASH = 16384


def _say(msg):
    print("picoiot: " + msg)


def _flash_root(path, raw):
    sim = raw.get("sim") if isinstance(raw, dict) else None
    if isinstance(sim, dict) and isinstance(sim.get("flash_dir"), str):
        return sim["flash_dir"]
    i = path.rfind("/")
    return path[:i] if i > 0 else "."


def _log_sink(s, root, free=-1):
    """The rotating log file, on by default on a board, sized for the flash that is free (free: bytes, -1: ask the
    filesystem): a full flash must not stop the device. Returns the file's path, or None (console only)."""
    from iotlib import log
    lg = s["log"] if s else {"file": True, "max_bytes": 16384, "backups": 2, "level": "info"}
    log.configure(level=lg["level"])
    if not lg["file"]:
        return None
    if free == -1:
        try:
            import os
            st = os.statvfs(root or "/")
            free = st[0] * st[3]
        except (OSError, AttributeError, ImportError):
            free = None
    if free is not None and free < _MIN_LOG_FLASH:
        _say("no free flash for the log file (%d bytes free): console only" % free)
        log.get("main").warning("no free flash for the log file: console only", free_bytes=free)
        return None
    per = lg["max_bytes"]
    if free is not None:
        per = min(per, free // _LOG_SHARE // (lg["backups"] + 1))
    path = (root.rstrip("/") if root else "") + "/log/device.log"
    log.configure(level=lg["level"], path=path, max_bytes=per, backups=lg["backups"])
    return path


def idle(reason, raw=None):
    """Unusable settings: say why, switch the radio off, release the relay pins and return (REPL reachable)."""
    from iotlib import hal, log
    _say("settings: " + reason)
    _say("idle: Wi-Fi off, relays off, REPL reachable; fix the settings file (picoiot deploy --settings FILE)")
    log.get("main").error("settings unusable: idle", reason=reason)
    try:
        hal.WLAN(hal.STA_IF).active(False)
    except (OSError, AttributeError, ValueError):
        pass
    pins = ((raw or {}).get("controller") or {}).get("relay_pins") if isinstance(raw, dict) else None
    if isinstance(pins, dict):
        for p in pins.values():
            if isinstance(p, int) and 0 <= p <= 28 and p not in (23, 24, 25):
                try:
                    hal.Pin(p, hal.Pin.IN)
                except (OSError, ValueError, AttributeError):
                    pass


_MODULES = ("iotlib.fsutil", "iotlib.config", "iotlib.auth", "iotlib.alarms", "iotlib.watchdog", "iotlib.http",
            "iotlib.metrics", "iotlib.net", "iotlib.state", "iotlib.timesync", "iotlib.web",
            "iotlib.device")


def preload(kind):
    # All the code first, so the long-lived bytecode packs together at one end of the heap instead of being
    # interleaved with the objects created while booting (as main_sim does): less fragmentation.
    import gc
    for m in _MODULES + (("iotlib.relays", "iotlib.relays_api", "relays_controller") if kind == "relays" else
                         ("iotlib.sensors", "iotlib.wsstream", "sensors_controller")):
        __import__(m)
        gc.collect()


def build(s, flash_dir=None):
    """The controller the settings name, with the seed's constructor keyword arguments."""
    ssid, password = s["wifi"][0]
    kw = dict(s["controller"])
    kw.update(wifi_ssid=ssid, wifi_password=password, device_id=s["device_id"], device_key=s["device_key"],
              service_discovery_url=s["service_discovery_url"], namespace=s["namespace"], host=s["host"],
              port=s["port"], flash_dir=flash_dir)
    if s["kind"] == "relays":
        from relays_controller import RelaysController as C
    else:
        from sensors_controller import SensorsController as C
    ctl = C(**kw)
    ctl.wifi_networks = s["wifi"][1:]
    ctl.cadata = s["ca"]
    ctl.ota_public_key = s["ota_public_key"]
    sim = s["sim"]
    if sim:  # a test's short HTTP timeouts (a stalled control plane found in seconds): the client's defaults change
        from iotlib.http import HTTPClient
        for k in ("timeout_ms", "connect_timeout_ms"):
            if isinstance(sim.get("http_" + k), int):
                setattr(HTTPClient, k, sim["http_" + k])
    return ctl


def load(path):
    """(settings, raw) or (None, raw) after idle(): the settings module is dropped again either way."""
    from iotlib import settings as S
    raw = None
    try:
        raw = S.read(path)
        return S.validate(raw), raw
    except S.SettingsError as e:
        return str(e), raw
    finally:
        S = None
        sys.modules.pop("iotlib.settings", None)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from iotlib import hal
    path = argv[0] if argv else SETTINGS if not hal.SIMULATED else "./" + SETTINGS
    if not hal.SIMULATED:
        path = "/" + SETTINGS
    s, raw = load(path)
    root = ""
    if hal.SIMULATED:
        import picosim as sim
        root = _flash_root(path, raw)
        sim.configure(flash_root=root)
    from iotlib import compat, timesync
    timesync.clock_unsynced(hal.rtc_ms)  # an RTC starts at 2021 on every power-on: unsynced until registration/SNTP
    _log_sink(s if isinstance(s, dict) else None, root)
    if not isinstance(s, dict):
        idle(s or "unreadable", raw)
        return EXIT_CONFIG
    raw = None
    flash_dir = root if hal.SIMULATED else None
    from iotlib.device import update_pending
    if not update_pending(flash_dir):  # an update boot loads only what installing the update needs
        preload(s["kind"])
    ctl = build(s, flash_dir)
    s = None
    import gc
    gc.collect()
    _say("starting %s" % ctl.device_id)
    compat.asyncio.run(ctl.main())


if __name__ == "__main__":
    rc = main()
    if rc:
        from iotlib import hal
        if hal.SIMULATED:  # the unix port: tell the launcher; a board returns to the REPL instead
            sys.exit(rc)
