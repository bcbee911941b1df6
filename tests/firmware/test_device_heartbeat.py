# Device._send_heartbeat, the glue between WatchdogManager's heartbeat body and the control plane.
import fwtest
from iotlib.device import Device


class _Resp:
    status = 200

    def json(self):
        return {"ack": 1, "pending": {}}


class _HTTP:
    def __init__(self):
        self.sent = []

    async def request(self, method, url, json=None, headers=None):
        self.sent.append(json)
        return _Resp()


class _Auth:
    token = "t"
    services = {"heartbeat": "http://127.0.0.1:1/hb"}

    def auth_header(self):
        return {"Authorization": "Bearer t"}


class _Cfg:
    version = 3


class _Dev:
    def __init__(self):
        self.auth = _Auth()
        self.cfg = _Cfg()
        self.http = _HTTP()
        self.contacts = 0

    def _contact(self):
        self.contacts += 1


def test_heartbeat_without_heap_figure_is_sent():
    # Regression: on CPython WatchdogManager sends mem_free None (no GC heap figure) and the comparison `None < 0`
    # raised TypeError, so every heartbeat of a CPython device failed.
    d = _Dev()
    answer = fwtest.run(Device._send_heartbeat(d, {"seq": 1, "uptime": 5, "mem_free": None}))
    assert answer["ack"] == 1 and d.contacts == 1
    assert "mem_free" not in d.http.sent[0] and d.http.sent[0]["config_version"] == 3


def test_heartbeat_carries_a_real_heap_figure():
    d = _Dev()
    fwtest.run(Device._send_heartbeat(d, {"seq": 2, "uptime": 5, "mem_free": 1234}))
    assert d.http.sent[0]["mem_free"] == 1234
