# iotlib: a package of small modules; `from iotlib import NetworkManager` imports only net.py.
# Lazy exports through a module-level __getattr__ (as micropython-lib's asyncio does with _attrs), so a device
# pays RAM only for the managers it uses.
__version__ = "0.1.0"

_attrs = {
    "Logger": "log",
    "ConfigManager": "config",
    "ConfigError": "config",
    "AuthManager": "auth",
    "RateLimiter": "auth",
    "AuthError": "auth",
    "NetworkManager": "net",
    "HTTPClient": "http",
    "HTTPError": "http",
    "WatchdogManager": "watchdog",
    "SimulatedReset": "hal",
    "StateManager": "state",
    "StateError": "state",
    "TimeSyncManager": "timesync",
    "SNTPError": "timesync",
    "AlarmManager": "alarms",
    "OTAUpdateManager": "ota",
    "Metrics": "metrics",
    "DeviceWeb": "web",
    "WSStream": "wsstream",
    "RelayBank": "relays",
    "SensorHub": "sensors",
    "Device": "device",
}


def __getattr__(attr):
    mod = _attrs.get(attr, None)
    if mod is None:
        # MicroPython routes `from iotlib import submodule` through here too: import it, or fail clearly.
        if attr.startswith("__"):
            raise AttributeError(attr)
        try:
            value = __import__("iotlib." + attr, None, None, [attr])
        except ImportError:
            raise AttributeError(attr)
        globals()[attr] = value
        return value
    value = getattr(__import__("iotlib." + mod, None, None, [attr]), attr)
    globals()[attr] = value
    return value
