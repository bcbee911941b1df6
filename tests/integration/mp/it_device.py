# Device-side glue for the integration scenarios (compiled and run by tests/integration, never shipped): the iotlib
# managers wired the way a controller wires them, and the channel to the test's orchestrator (the "operator" side).
# Runs unchanged on CPython (imported by pytest) and on the unix MicroPython (.mpy, 192K heap, as a subprocess).
import json
import sys

from iotlib.http import HTTPClient
from iotlib.auth import AuthManager

# The relays board the scenarios boot with (the control plane's `relays` type has the same two relays).
BOARD_RELAYS = {"relay1": {"pin": 2}, "relay2": {"pin": 3}}


def relays_config():
    """(schema, defaults) of the relays controller (firmware/relays_controller.py): what a relays device validates
    the control plane's config against; its relay bank's hot-reload callback checks the relays in depth."""
    from relays_controller import RelaysController
    c = RelaysController("lab", "", "it", "-", "http://127.0.0.1")
    return c.schema(), c.defaults()


# A representative schema whose defaults name built-in relays (a map section): the shape in which a relay removed by
# the operator used to come back from the device's defaults (see it_config_remove).
_RELAY = {
    "pin": {"type": "int", "required": True, "min": 0, "max": 28},
    "active_low": {"type": "bool"},
    "power_on": {"type": "str", "enum": ["off", "on", "restore"]},
    "interlock": {"type": "str", "nullable": True, "min": 1, "max": 32},
    "max_on_s": {"type": "number", "min": 0},
    "pulse_ms": {"type": "int", "min": 0},
    "failsafe": {"type": "str", "enum": ["off", "on", "keep"]},
}
RELAYS_SCHEMA = {
    "heartbeat_interval_s": {"type": "int", "min": 1, "max": 3600},
    "time": {"servers": {"type": "list", "items": {"type": "str", "min": 1}, "max": 4},
             "interval_s": {"type": "int", "min": 16, "max": 86400}},
    "api": {"token_hashes": {"type": "list", "items": {"type": "str", "min": 64, "max": 64}, "max": 16},
            "tokens": {"type": "list", "items": {"type": "dict"}, "max": 16},
            "rate_per_s": {"type": "number", "min": 0, "max": 1000},
            "burst": {"type": "int", "min": 1, "max": 1000}},
    "log": {"level": {"type": "str", "enum": ["debug", "info", "warning", "error", "critical"]}},
    "relays": {"*": _RELAY},
    "failsafe_after_s": {"type": "number", "min": 0, "max": 86400},
}
RELAYS_DEFAULTS = {
    "heartbeat_interval_s": 10,
    "time": {"servers": [], "interval_s": 3600},
    "api": {"token_hashes": [], "rate_per_s": 5, "burst": 10},
    "log": {"level": "info"},
    "relays": {
        "relay1": {"pin": 2, "active_low": False, "power_on": "off", "max_on_s": 0, "failsafe": "keep"},
        "relay2": {"pin": 3, "active_low": False, "power_on": "off", "max_on_s": 0, "failsafe": "keep"},
    },
    "failsafe_after_s": 0,
}


def contains(big, small, path=""):
    """Problems where `big` does not hold every value of `small` (recursively); [] when it does."""
    if isinstance(small, dict) and isinstance(big, dict):
        out = []
        for k in small:
            if k not in big:
                out.append(path + k + ": missing")
            else:
                out += contains(big[k], small[k], path + k + ".")
        return out
    return [] if big == small else [path + ": %r != %r" % (big, small)]


class Ctl:
    """The orchestrator. ask(op, **args) runs an operator-side step to completion (blocking: the device is paused, as
    if it were busy) and returns its result. In-process (CPython) it is a function call; under MicroPython it is one
    JSON line each way over stdout/stdin."""

    def __init__(self, fn=None):
        self._fn = fn
        self.min_free = None  # MicroPython: lowest free heap (after a collection) seen at the steps

    def ask(self, op, **args):
        if self._fn is not None:
            return self._fn(op, args)
        import gc
        gc.collect()
        free = gc.mem_free()
        if self.min_free is None or free < self.min_free:
            self.min_free = free
        sys.stdout.write("@@ASK " + json.dumps({"op": op, "args": args}) + "\n")
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("orchestrator went away")
        ans = json.loads(line)
        if "error" in ans:
            raise AssertionError("orchestrator step %s failed: %s" % (op, ans["error"]))
        return ans.get("result")


class Device:
    """One simulated device's connection to the control plane: HTTP client + registration, and a heartbeat sender for
    WatchdogManager.heartbeat()."""

    def __init__(self, p, key=None, namespace=None, clock=None, **http_kw):
        self.p = p
        if "timeout_ms" not in http_kw:
            http_kw["timeout_ms"] = 40000  # above every long-poll wait the scenarios use
        self.http = HTTPClient(connect_timeout_ms=3000, **http_kw)
        info = {"device_type": p.get("device_type", "relays"), "firmware": "0.1.0",
                "capabilities": ["relays", "rest"], "address": "http://127.0.0.1:8081", "reset_cause": "power_on"}
        kw = {} if clock is None else {"clock": clock}
        self.auth = AuthManager(p["device_id"], key or p["device_key"], p["sd_url"], info=info,
                                namespace=namespace or p.get("namespace"), **kw)
        self.hb_wait = None  # seconds: the next heartbeat is a long-poll

    def url(self, name):
        return self.auth.services[name]

    @property
    def token(self):
        return self.auth.token

    async def register(self):
        return await self.auth.register(self.http)

    async def send_heartbeat(self, body):
        """WatchdogManager's `send`: POST the heartbeat, the answer dict back; raises on any failure."""
        url = self.url("heartbeat")
        timeout = None
        if self.hb_wait:
            url += "?wait=%d" % self.hb_wait
            timeout = (self.hb_wait + 10) * 1000
        r = await self.http.request("POST", url, json=body, headers=self.auth.auth_header(), timeout_ms=timeout)
        if r.status != 200:
            raise ValueError("heartbeat refused: HTTP %d %s" % (r.status, r.body[:200]))
        return r.json()


class Recorder:
    """An HTTPClient stand-in that records each request (method, url, json) and passes it on."""

    def __init__(self, http):
        self.http = http
        self.calls = []

    async def request(self, method, url, json=None, **kw):
        self.calls.append((method, url, json))
        return await self.http.request(method, url, json=json, **kw)


def relay_delta_handler(bank):
    """StateManager.on_delta callback: switch the relays the delta names, report what they are now."""
    async def on_delta(delta):
        out = {}
        for name in delta:
            if name in bank:
                out[name] = await bank.set(name, delta[name])
        return out
    return on_delta


def read_json(path):
    with open(path) as f:
        return json.loads(f.read())
