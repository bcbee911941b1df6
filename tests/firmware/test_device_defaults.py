# Device.defaults(): every call a config of its own. Callers merge into and edit what it returns (a controller sets its
# sections, Device.boot merges the factory config): an edit to a nested section must not reach the next caller.
from relays_controller import RelaysController
from sensors_controller import SensorsController

_ARGS = ("ssid", "password", "d-1", "k" * 64, "http://127.0.0.1:1/api/devices")


def _edit(d):
    d["time"]["servers"].append("ntp.example")
    d["time"]["interval_s"] = 16
    d["api"]["tokens"].append({"role": "admin"})
    d["api"]["rate_per_s"] = 1000
    d["log"]["level"] = "debug"


def test_editing_the_defaults_changes_no_one_elses():
    for cls in (RelaysController, SensorsController):
        first, second = cls(*_ARGS), cls(*_ARGS)
        want = first.defaults()
        _edit(first.defaults())
        for d in (first.defaults(), second.defaults()):
            assert d == want, (cls.__name__, d)
            assert d["time"]["servers"] == [] and d["api"]["tokens"] == [] and d["log"]["level"] == "info"
