# Run one controller on the simulated board (unix micropython or CPython):
#   MICROPYPATH=build/fwtest:.frozen micropython -X heapsize=192K -m main_sim settings.json
#   python firmware/main_sim.py settings.json
# settings.json: the key file of `picoiot provision` ({device_id, device_key, namespace, service_discovery_url})
# plus optional kind ("relays"|"sensors"), port, host, flash_dir, relay_pins, wifi_ssid, wifi_password, and config (a
# factory config merged over the built-in defaults until the control plane sends one).
# ota_public_key (64 hex) enables OTA checks against releases signed with that key (docs/ota.md).
# Environment variables override the file: PICOIOT_KIND, PICOIOT_DEVICE_ID, PICOIOT_DEVICE_KEY, PICOIOT_SD_URL,
# PICOIOT_NAMESPACE, PICOIOT_PORT, PICOIOT_HOST, PICOIOT_FLASH. When the local API listens it prints one line:
#   picoiot device <id> listening on http://127.0.0.1:<port>
# A simulated reset ends the process with status 75 (picosim.RESET_EXIT_CODE): restart it with the same flash.
# Ctrl-C (SIGINT) ends the process at once, by the signal, as pulling a board's power would: the firmware survives that.
import sys
import os
import json

_ENV = (("PICOIOT_KIND", "kind"), ("PICOIOT_DEVICE_ID", "device_id"), ("PICOIOT_DEVICE_KEY", "device_key"),
        ("PICOIOT_SD_URL", "service_discovery_url"), ("PICOIOT_NAMESPACE", "namespace"), ("PICOIOT_PORT", "port"),
        ("PICOIOT_HOST", "host"), ("PICOIOT_FLASH", "flash_dir"))


def settings(argv):
    s = {}
    path = None
    for a in argv:
        if a.endswith(".json"):
            path = a
    path = path or os.getenv("PICOIOT_DEVICE_SETTINGS")
    if path:
        with open(path) as f:
            s = json.loads(f.read())
    for env, key in _ENV:
        v = os.getenv(env)
        if v:
            s[key] = v
    s["port"] = int(s.get("port", 8080))
    s.setdefault("kind", "relays")
    s.setdefault("host", "127.0.0.1")
    s.setdefault("flash_dir", "flash-" + str(s.get("device_id", "device")))
    missing = [k for k in ("device_id", "device_key", "service_discovery_url") if not s.get(k)]
    if missing:
        raise SystemExit("main_sim: missing settings: " + ", ".join(missing))
    if s["kind"] not in ("relays", "sensors"):
        raise SystemExit("main_sim: kind must be relays or sensors")
    return s


_MODULES = ("iotlib.log", "iotlib.fsutil", "iotlib.hal", "iotlib.config", "iotlib.auth", "iotlib.alarms",
            "iotlib.watchdog", "iotlib.http", "iotlib.metrics", "iotlib.net", "iotlib.state", "iotlib.timesync",
            "iotlib.web", "iotlib.device")
_DOMAIN = {"relays": ("iotlib.relays", "iotlib.relays_api", "relays_controller"),
           "sensors": ("iotlib.sensors", "iotlib.wsstream", "sensors_controller")}


def preload(kind):
    # Load all the code first, so the long-lived bytecode packs together at one end of the heap instead of being
    # interleaved with the objects created while booting: less fragmentation, a smaller heap suffices.
    import gc
    for m in _MODULES + _DOMAIN[kind]:
        __import__(m)
        gc.collect()


def make(s):
    kw = {"namespace": s.get("namespace"), "config": s.get("config"), "host": s["host"], "port": s["port"], "flash_dir": s["flash_dir"],
          "address": "http://%s:%d" % ("127.0.0.1" if s["host"] == "0.0.0.0" else s["host"], s["port"])}
    args = (s.get("wifi_ssid", "sim-ap"), s.get("wifi_password", "sim-password"), s["device_id"], s["device_key"],
            s["service_discovery_url"])
    if s["kind"] == "relays":
        from relays_controller import RelaysController
        ctl = RelaysController(*args, relay_pins=s.get("relay_pins"), **kw)
    else:
        from sensors_controller import SensorsController
        ctl = SensorsController(*args, **kw)
    if s.get("ca"):  # base64 DER, as in a board's settings: the client verifies an https control plane with it
        import binascii
        ctl.cadata = binascii.a2b_base64(s["ca"])
    if s.get("ota_public_key"):
        ctl.ota_public_key = s["ota_public_key"]  # Ed25519 key (64 hex) releases must be signed with (docs/ota.md)
    return ctl


async def run(s):
    from iotlib.compat import asyncio
    from iotlib.device import update_pending
    if not update_pending(s["flash_dir"]):  # an update boot loads only what installing the update needs
        preload(s["kind"])
    ctl = make(s)
    await ctl.start()
    print("picoiot device %s listening on http://%s:%d" % (s["device_id"], ctl.address.split("//")[1].split(":")[0],
                                                           s["port"]))
    try:
        sys.stdout.flush()
    except AttributeError:
        pass
    while True:
        await asyncio.sleep(3600)


def main(argv=None, entry=None):
    """The process: settings from argv, the simulated board on its flash, then entry(settings) (default run), a
    coroutine that calls run(settings) (a test's or a bench's wrapper) until the process ends."""
    # Ctrl-C: not a KeyboardInterrupt. The unix port raises it from inside its signal handler, at whatever C instruction
    # the interpreter is at (MICROPY_ASYNC_KBD_INTR): half-way through a task switch it turned into a NameError or a
    # StopIteration that asyncio logged and ran on from, and the device did not stop. CPython's asyncio.run cancels
    # the tasks, then logs the connections the local API accepted meanwhile.
    try:
        from micropython import kbd_intr
        kbd_intr(-1)  # the unix port: SIGINT back to the default action
    except ImportError:  # CPython
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    s = settings(sys.argv[1:] if argv is None else argv)
    import picosim as sim
    from iotlib.fsutil import makedirs
    makedirs(s["flash_dir"])
    sim.configure(flash_root=s["flash_dir"])
    from iotlib.compat import asyncio
    asyncio.run((entry or run)(s))


if __name__ == "__main__":
    p = getattr(os, "path", None)  # CPython: python firmware/main_sim.py finds iotlib beside it
    if p is not None:
        here = p.dirname(p.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
    main(sys.argv[1:])
