import fwtest
import webclient as wc
from iotlib.compat import asyncio, epoch_ms
from iotlib import relays as R
from iotlib.auth import AuthManager, jwt_encode
from iotlib.metrics import Metrics
from iotlib.web import DeviceWeb
from iotlib.relays_api import install


class Board:
    """Recording pins that count, after every write, the moments when both interlocked pins are on."""

    def __init__(self):
        self.levels = {}
        self.writes = {2: 0, 3: 0}
        self.violations = 0

    def factory(self, pin_no, level):
        board = self
        board.levels[pin_no] = level

        class P:
            def value(self, v=None):
                if v is None:
                    return board.levels[pin_no]
                board.levels[pin_no] = v
                board.writes[pin_no] += 1
                if board.levels.get(2) == 1 and board.levels.get(3) == 1:
                    board.violations += 1
        return P()


def test_rest_switching_interlock_under_concurrent_requests():
    # The RelaysController's REST routes (iotlib.relays_api) on a real DeviceWeb, real sockets, recording pins; many clients at once.

    key, dev = "k" * 64, "relay-t"
    b = Board()

    def tok(role):
        return jwt_encode({"sub": "t", "role": role, "aud": dev, "exp": epoch_ms() // 1000 + 600}, key)

    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"up": {"pin": 2, "interlock": "blind"}, "down": {"pin": 3, "interlock": "blind"}})
    web = DeviceWeb(AuthManager(dev, key).verify, metrics=Metrics())
    web.configure({"rate_per_s": 1000, "burst": 1000})
    web.max_connections = 4
    install(web, bank)
    op, viewer = tok("operator"), tok("viewer")

    async def client(name, n, codes):
        for i in range(n):
            s, h, body = await wc.request(port[0], "POST", "/gpio/" + name, token=op,
                                          body={"state": "on" if i % 2 == 0 else "toggle"})
            codes.append(s)

    port = [0]

    async def go():
        port[0] = await wc.start(web)
        try:
            codes = []
            await asyncio.gather(*[client(n, 8, codes) for n in ("up", "down", "up", "down")])
            assert codes == [200] * 32, codes
            s, h, body = await wc.request(port[0], "GET", "/gpio", token=viewer)
            on = [r["name"] for r in body["relays"] if r["state"] == "on"]
            assert s == 200 and len(on) <= 1
            s, h, body = await wc.request(port[0], "POST", "/gpio/up", token=viewer, body={"state": "on"})
            assert s == 403
            s, h, body = await wc.request(port[0], "POST", "/gpio/up", body={"state": "on"})
            assert s == 401
            s, h, body = await wc.request(port[0], "POST", "/gpio/sideways", token=op, body={"state": "on"})
            assert s == 404 and body == {"error": "unknown relay 'sideways'"}
            for bad in ({"state": "blink"}, {"state": "on", "pulse_ms": -1}, {"state": "on", "colour": "red"}, {}):
                s, h, body = await wc.request(port[0], "POST", "/gpio/up", token=op, body=bad)
                assert s == 400 and body["error"], (bad, s, body)
        finally:
            await web.stop()
    fwtest.run(go())
    assert b.writes[2] > 5 and b.writes[3] > 5
    assert b.violations == 0
