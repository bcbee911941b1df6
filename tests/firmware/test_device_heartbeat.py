# Device._send_heartbeat, the glue between WatchdogManager's heartbeat body and the control plane.
import fwtest
from iotlib.device import Device


class _Resp:
    status = 200
    headers = {}

    def json(self):
        return {"ack": 1, "pending": {}}


class _HTTP:
    def __init__(self):
        self.sent = []
        self.urls = []
        self.kw = []

    async def request(self, method, url, json=None, headers=None, **kw):
        self.sent.append(json)
        self.urls.append(url)
        self.kw.append(kw)
        return _Resp()


class _WD:
    heartbeat_hold_ms = 0
    heartbeat_timeout_ms = 10000
    again = False


class _Auth:
    token = "t"
    services = {"heartbeat": "http://127.0.0.1:1/hb"}

    def auth_header(self):
        return {"Authorization": "Bearer t"}


class _Cfg:
    version = 3
    rejected = None


class _Flag:
    is_set = False

    def set(self):
        self.is_set = True


class _Dev:
    sm = None
    net = None

    def telemetry(self):
        return None

    def __init__(self):
        self.auth = _Auth()
        self.cfg = _Cfg()
        self.http = _HTTP()
        self.contacts = 0
        self.wd = _WD()
        self._known = [None, None, None]
        self._config_wake = _Flag()
        self._ota_wake = _Flag()

    def _contact(self):
        self.contacts += 1


def test_heartbeat_without_heap_figure_is_sent():
    # Regression: on CPython WatchdogManager sends mem_free None (no GC heap figure) and the comparison `None < 0`
    # raised TypeError, so every heartbeat of a CPython device failed.
    d = _Dev()
    answer = fwtest.run(Device._send_heartbeat(d, {"seq": 1, "uptime": 5, "mem_free": None}))
    assert answer["ack"] == 1 and d.contacts == 1
    assert d.http.sent[0]["mem_free"] is None


def test_heartbeat_carries_a_real_heap_figure():
    d = _Dev()
    fwtest.run(Device._send_heartbeat(d, {"seq": 2, "uptime": 5, "mem_free": 1234}))
    assert d.http.sent[0]["mem_free"] == 1234


def test_the_heartbeat_body_is_built_in_one_place():
    # Device._heartbeat_body: everything beside the watchdog's seq/uptime/mem_free, the controller's telemetry in it
    class _D(_Dev):
        def telemetry(self):
            return {"relay1": [[1, 5]]}
    d = _D()
    body = Device._heartbeat_body(d)
    assert body["firmware"] and body["config_version"] == 3 and body["state_version"] is None
    assert body["rssi"] is None and body["reconnects"] == 0 and body["t"] == {"relay1": [[1, 5]]}
    d.telemetry = lambda: None
    assert "t" not in Device._heartbeat_body(d)


def test_long_poll_heartbeat_names_the_versions_it_was_told_of():
    d = _Dev()
    d.wd.heartbeat_hold_ms = 10000
    fwtest.run(Device._send_heartbeat(d, {"seq": 1, "uptime": 5, "config_version": 3, "state_version": None}))
    assert d.http.urls[-1] == "http://127.0.0.1:1/hb?wait=10&config_version=3&ota="
    assert d.http.kw[-1]["yieldable"] is True
    assert d.http.kw[-1]["timeout_ms"] == 20000
    Device._heartbeat_answer(d, {"ack": 1, "pending": {"config_version": 4, "state_version": 9}})
    assert d._known == [4, 9, None] and d.wd.again is True and d._config_wake.is_set
    d.wd.again = False
    Device._heartbeat_answer(d, {"ack": 2, "pending": {"config_version": 4, "state_version": 9}})
    assert d.wd.again is False, "nothing new: the next poll is paced by the interval"
    fwtest.run(Device._send_heartbeat(d, {"seq": 2, "uptime": 5, "config_version": 3, "state_version": None}))
    assert d.http.urls[-1] == "http://127.0.0.1:1/hb?wait=10&config_version=4&state_version=9&ota="


def test_long_poll_heartbeat_names_the_ota_offer_it_was_told_of():
    # else an assignment would not answer a held poll (the server could not tell it is news), and an offer already
    # told of would answer every poll at once
    d = _Dev()
    d.wd.heartbeat_hold_ms = 10000
    Device._heartbeat_answer(d, {"ack": 1, "pending": {"config_version": 3, "state_version": 9, "ota": "2.0+b1"}})
    assert d._known[2] == "2.0+b1" and d.wd.again is True and d._ota_wake.is_set
    fwtest.run(Device._send_heartbeat(d, {"seq": 2, "uptime": 5, "config_version": 3, "state_version": None}))
    assert d.http.urls[-1] == "http://127.0.0.1:1/hb?wait=10&config_version=3&state_version=9&ota=2.0%2Bb1"
    d.wd.again = False
    Device._heartbeat_answer(d, {"ack": 2, "pending": {"config_version": 3, "state_version": 9, "ota": "2.0+b1"}})
    assert d.wd.again is False
    Device._heartbeat_answer(d, {"ack": 3, "pending": {"config_version": 3, "state_version": 9, "ota": None}})
    assert d._known[2] is None and d.wd.again is True
    fwtest.run(Device._send_heartbeat(d, {"seq": 3, "uptime": 5, "config_version": 3, "state_version": None}))
    assert d.http.urls[-1].endswith("&ota=")


def test_a_yielded_long_poll_is_asked_again_at_once():
    from iotlib.http import Yielded

    class _Yielding(_HTTP):
        async def request(self, method, url, json=None, headers=None, **kw):
            raise Yielded("long-poll gave the connection up")
    d = _Dev()
    d.wd.heartbeat_hold_ms = 10000
    d.http = _Yielding()
    assert fwtest.run(Device._send_heartbeat(d, {"seq": 7, "uptime": 5, "config_version": 3,
                                                 "state_version": None})) == {"ack": 7}
    assert d.wd.again is True and d.contacts == 0
