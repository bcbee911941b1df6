# The board settings file (docs/hardware.md, "The settings file"; its JSON Schema: docs/board-settings.schema.json):
# Wi-Fi networks, the device's identity and key, the discovery URL, the control plane's CA, the OTA key, the
# controller and its constructor arguments. main.py loads it once at boot and drops this module again.
# Every problem is a SettingsError naming the field ("wifi[0].ssid must be a string of 1-32 characters"); the message
# never contains a value (and no "name: value" shape, which the log's masking would take for a secret).
import json

from iotlib.compat import const

KINDS = ("relays", "sensors")
#: Pico W GPIOs a relay or a sensor bus may use: 0-22 and 26-28 (23, 24, 25 and 29 are wired to the Wi-Fi chip).
_MAX_GPIO = const(28)
_WIFI_PINS = (23, 24, 25, 29)
_MAX_NETWORKS = const(4)
_TOP = ("version", "kind", "device_id", "device_key", "namespace", "service_discovery_url", "wifi", "ca",
        "ota_public_key", "controller", "api_tokens", "host", "port", "log", "sim")


class SettingsError(ValueError):
    """The settings file is missing, unreadable or invalid; str(e) names the field."""


def _str(v, field, lo=1, hi=256):
    if not isinstance(v, str) or not lo <= len(v) <= hi:
        raise SettingsError("%s must be a string of %d-%d characters" % (field, lo, hi))
    return v


def _int(v, field, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SettingsError("%s must be an integer %d-%d" % (field, lo, hi))
    return v


def _hex(v, field, n):
    if not isinstance(v, str) or len(v) != n:
        raise SettingsError("%s must be %d hex digits" % (field, n))
    for c in v.lower():
        if c not in "0123456789abcdef":
            raise SettingsError("%s must be %d hex digits" % (field, n))
    return v.lower()


def _dict(v, field):
    if not isinstance(v, dict):
        raise SettingsError("%s must be an object" % field)
    return v


def gpio(v, field, used):
    """A GPIO a Pico W lets us drive, not used twice."""
    _int(v, field, 0, _MAX_GPIO)
    if v in _WIFI_PINS:
        raise SettingsError("%s cannot be GPIO%d: it is wired to the Wi-Fi chip on a Pico W" % (field, v))
    if v in used:
        raise SettingsError("%s cannot be GPIO%d: already used by %s" % (field, v, used[v]))
    used[v] = field
    return v


def _ca(v):
    # stored as base64 DER (what the port's TLS takes); a PEM text is accepted and converted
    import binascii
    if not isinstance(v, str) or len(v) < 64:
        raise SettingsError("ca must be the CA certificate, base64 DER or PEM")
    try:
        if "-----BEGIN" in v:
            from iotlib.http import pem_to_der
            der = pem_to_der(v)
        else:
            der = binascii.a2b_base64(v)
    except ValueError:
        raise SettingsError("ca is not a base64 DER or PEM certificate")
    if len(der) < 64 or der[0] != 0x30:  # a certificate is a DER SEQUENCE
        raise SettingsError("ca is not a DER certificate")
    return der


def _wifi(v):
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not 1 <= len(v) <= _MAX_NETWORKS:
        raise SettingsError("wifi must be a list of 1-%d networks {ssid, password}" % _MAX_NETWORKS)
    out = []
    for i, n in enumerate(v):
        f = "wifi[%d]" % i
        _dict(n, f)
        ssid = _str(n.get("ssid"), f + ".ssid", 1, 32)
        pw = n.get("password", "")
        if not isinstance(pw, str) or len(pw) > 64 or 0 < len(pw) < 8:
            raise SettingsError(f + ".password must be empty (open network) or 8-64 characters")
        out.append((ssid, pw))
    return out


def _controller(kind, v):
    c = _dict(v if v is not None else {}, "controller")
    used = {}
    kw = {}
    for k in c:
        if k not in ("relay_pins", "config"):
            raise SettingsError("controller.%s is not an argument of the controllers (relay_pins, config)" % k)
    if "relay_pins" in c:
        if kind != "relays":
            raise SettingsError("controller.relay_pins is only for kind relays")
        pins = _dict(c["relay_pins"], "controller.relay_pins")
        if not 1 <= len(pins) <= 8:
            raise SettingsError("controller.relay_pins must name 1-8 relays")
        for name in pins:
            _str(name, "controller.relay_pins (a name)", 1, 32)
            gpio(pins[name], "controller.relay_pins." + name, used)
        kw["relay_pins"] = pins
    cfg = c.get("config")
    if cfg is not None:
        _dict(cfg, "controller.config")
        i2c = cfg.get("i2c")
        if i2c is not None:
            _dict(i2c, "controller.config.i2c")
            for p in ("sda", "scl"):
                if p in i2c:
                    gpio(i2c[p], "controller.config.i2c." + p, used)
        kw["config"] = cfg
    return kw


def validate(d):
    """The checked, normalised settings from the parsed file; SettingsError names the first bad field."""
    _dict(d, "settings")
    for k in d:
        if k not in _TOP:
            raise SettingsError("%s is not a known field" % k)
    for k in ("kind", "device_id", "device_key", "service_discovery_url", "wifi"):
        if k not in d:
            raise SettingsError("%s is missing" % k)
    if d.get("version", 1) != 1:
        raise SettingsError("version must be 1: this firmware reads version 1")
    kind = d["kind"]
    if kind not in KINDS:
        raise SettingsError("kind must be relays or sensors")
    s = {"kind": kind, "device_id": _str(d["device_id"], "device_id", 1, 64),
         "device_key": _str(d["device_key"], "device_key", 16, 128),
         "namespace": _str(d.get("namespace", "default"), "namespace", 1, 64),
         "wifi": _wifi(d["wifi"]), "host": _str(d.get("host", "0.0.0.0"), "host", 1, 64),
         "port": _int(d.get("port", 80), "port", 1, 65535)}
    url = _str(d["service_discovery_url"], "service_discovery_url", 10, 256)
    if not (url.startswith("http://") or url.startswith("https://")):
        raise SettingsError("service_discovery_url must start with http:// or https://")
    s["service_discovery_url"] = url
    s["ca"] = _ca(d["ca"]) if d.get("ca") is not None else None
    if url.startswith("https://") and s["ca"] is None:
        raise SettingsError("ca is missing, and service_discovery_url is https (the device verifies the server with it)")
    s["ota_public_key"] = _hex(d["ota_public_key"], "ota_public_key", 64) if d.get("ota_public_key") else None
    kw = _controller(kind, d.get("controller"))
    tokens = d.get("api_tokens") or []
    if not isinstance(tokens, list) or len(tokens) > 16:
        raise SettingsError("api_tokens must be a list of at most 16 {sha256, role}")
    for i, t in enumerate(tokens):
        f = "api_tokens[%d]" % i
        _dict(t, f)
        _hex(t.get("sha256"), f + ".sha256", 64)
        if t.get("role") not in ("viewer", "operator", "admin"):
            raise SettingsError(f + ".role must be viewer, operator or admin")
    if tokens:
        cfg = kw.setdefault("config", {})
        api = cfg.setdefault("api", {})
        api["tokens"] = list(api.get("tokens") or ()) + tokens
    s["controller"] = kw
    lg = _dict(d.get("log", {}), "log")
    s["log"] = {"file": lg.get("file", True) is True, "level": lg.get("level", "info"),
                "max_bytes": _int(lg.get("max_bytes", 16384), "log.max_bytes", 1024, 1048576),
                "backups": _int(lg.get("backups", 2), "log.backups", 0, 9)}
    if s["log"]["level"] not in ("debug", "info", "warning", "error", "critical"):
        raise SettingsError("log.level must be debug, info, warning, error or critical")
    s["sim"] = _dict(d.get("sim", {}), "sim")
    return s


def read(path):
    """The parsed JSON of the settings file; SettingsError when it is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise SettingsError("settings file %s: missing or unreadable (write it with `picoiot provision "
                            "--board-settings` and `picoiot deploy`)" % path)
    try:
        return json.loads(text)
    except ValueError:
        raise SettingsError("settings file %s: not valid JSON (cut short?)" % path)
