import fwtest
from iotlib.compat import asyncio
from iotlib import relays as R
from iotlib import fsutil


class Board:
    """Pin factory recording every pin write, and checking after each write that no interlocked pair is ON."""

    def __init__(self, groups=()):
        self.levels = {}
        self.log = []
        self.groups = groups  # tuples of (pin, active_low) that must never be on together
        self.violations = 0

    def factory(self, pin_no, level):
        board = self

        class P:
            def value(self, v=None):
                if v is None:
                    return board.levels[pin_no]
                board.levels[pin_no] = v
                board.log.append((pin_no, v))
                board.check()

        board.levels[pin_no] = level
        board.log.append((pin_no, level))
        return P()

    def check(self):
        for group in self.groups:
            on = [p for p, low in group if self.levels.get(p) == (0 if low else 1)]
            if len(on) > 1:
                self.violations += 1


def cfg(**over):
    c = {"relay1": {"pin": 2}, "relay2": {"pin": 3}}
    for k, v in over.items():
        c[k] = v
    return c


def test_validate_names_every_problem():
    errs = R.validate({"a": {"pin": 99}, "b": {"pin": 2, "power_on": "maybe"}, "c": {"pin": 2},
                       "d": {"pin": 24}, "e!": {"pin": 5, "bogus": 1}, "f": {"pin": 6, "max_on_s": -1}})
    text = "\n".join(errs)
    assert "relays.a.pin: must be an integer 0-28" in text
    assert "relays.b.power_on: must be one of off|on|restore" in text
    assert "relays.c.pin: GPIO2 already used by b" in text
    assert "relays.d.pin: GPIO24 is wired to the Wi-Fi chip" in text
    assert "relays.e!: name must be" in text
    assert "relays.e!.bogus: unknown field" in text
    assert "relays.f.max_on_s: must be a number >= 0" in text
    assert R.validate([]) == ["relays: must be an object"]
    assert R.validate(cfg()) == []


def test_pins_claimed_at_off_level_active_low():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"r": {"pin": 4, "active_low": True}})
    assert b.log == [(4, 1)]  # never glitched low (= on) while claiming the pin
    fwtest.run(bank.set("r", "on"))
    assert b.levels[4] == 0 and bank.state("r") == "on"


def test_set_toggle_and_bad_input():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure(cfg())

    async def go():
        assert await bank.set("relay1", "on") == "on"
        assert await bank.set("relay1", "toggle") == "off"
        assert await bank.set("relay1", True) == "on"
        fwtest.raises(KeyError, lambda: bank._relays["nope"])
        e = None
        try:
            await bank.set("nope", "on")
        except KeyError as x:
            e = x
        assert e is not None
        for bad, pulse in (("blink", None), ("on", -5), ("on", "10"), ("on", True)):
            try:
                await bank.set("relay2", bad, pulse)
                raise AssertionError("accepted %r %r" % (bad, pulse))
            except ValueError:
                pass
        assert bank.states() == {"relay1": "on", "relay2": "off"}
    fwtest.run(go())


def test_interlock_offs_before_on_under_concurrency():
    groups = (((2, False), (3, False), (4, True)),)
    b = Board(groups)
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"a": {"pin": 2, "interlock": "g"}, "b": {"pin": 3, "interlock": "g"},
                    "c": {"pin": 4, "interlock": "g", "active_low": True}, "d": {"pin": 5}})

    async def flip(name, n):
        for i in range(n):
            await bank.set(name, "on" if i % 2 == 0 else "toggle")
            await asyncio.sleep(0)

    async def go():
        await asyncio.gather(flip("a", 30), flip("b", 30), flip("c", 30), flip("d", 30))
    fwtest.run(go())
    assert b.violations == 0
    on = [n for n in "abc" if bank.state(n) == "on"]
    assert len(on) <= 1
    assert len(b.log) > 60


def test_interlock_switches_partner_off_first():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"up": {"pin": 2, "interlock": "blind"}, "down": {"pin": 3, "interlock": "blind"}})
    fwtest.run(bank.set("up", "on"))
    del b.log[:]
    fwtest.run(bank.set("down", "on"))
    assert b.log == [(2, 0), (3, 1)]
    assert bank.states() == {"up": "off", "down": "on"}


def test_pulse_switches_back_off():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"bell": {"pin": 2, "pulse_ms": 30}, "door": {"pin": 3}})

    async def go():
        await bank.set("bell", "on")
        await bank.set("door", "on", pulse_ms=20)
        assert bank.state("bell") == "on" and bank.state("door") == "on"
        for _ in range(100):
            if bank.state("bell") == "off" and bank.state("door") == "off":
                break
            await asyncio.sleep(0.01)
        assert bank.states() == {"bell": "off", "door": "off"}
        # A new command cancels a pending pulse.
        await bank.set("door", "on", pulse_ms=20)
        await bank.set("door", "on")
        await asyncio.sleep(0.06)
        assert bank.state("door") == "on"
    fwtest.run(go())


def test_max_on_time_caps_on_and_long_pulse():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure({"pump": {"pin": 2, "max_on_s": 0.03}})

    async def go():
        await bank.set("pump", "on", pulse_ms=60000)
        for _ in range(100):
            if bank.state("pump") == "off":
                break
            await asyncio.sleep(0.01)
        assert bank.state("pump") == "off"
    fwtest.run(go())


def test_power_on_modes_and_restore_persistence():
    d = fwtest.tmpdir()
    path = d + "/relays.json"
    conf = {"a": {"pin": 2, "power_on": "restore"}, "b": {"pin": 3, "power_on": "on"},
            "c": {"pin": 4, "power_on": "off"}}
    bank = R.RelayBank(path=path, pin_factory=Board().factory)
    bank.configure(conf)
    assert bank.states() == {"a": "off", "b": "on", "c": "off"}
    fwtest.run(bank.set("a", "on"))
    fwtest.run(bank.set("c", "on"))
    assert fsutil.read_json(path) == {"a": True}
    writes = bank.persist_writes
    fwtest.run(bank.set("a", "on"))  # identical state: no flash write
    fwtest.run(bank.set("c", "off"))  # not a restore relay: no flash write
    assert bank.persist_writes == writes
    # "reboot": a new bank on the same flash file
    bank2 = R.RelayBank(path=path, pin_factory=Board().factory)
    bank2.configure(conf)
    assert bank2.states() == {"a": "on", "b": "on", "c": "off"}
    assert bank2.persist_writes == 0


def test_corrupt_state_file_boots_off():
    d = fwtest.tmpdir()
    path = d + "/relays.json"
    with open(path, "w") as f:
        f.write("{half")
    bank = R.RelayBank(path=path, pin_factory=Board().factory)
    bank.configure({"a": {"pin": 2, "power_on": "restore"}})
    assert bank.state("a") == "off"


def test_hot_reload_repins_old_pin_off_first_and_keeps_state():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure(cfg())
    fwtest.run(bank.set("relay1", "on"))
    fwtest.run(bank.set("relay2", "on"))
    del b.log[:]
    bank.configure({"relay1": {"pin": 6}, "relay3": {"pin": 7}})
    # old pin 2 off, old pin 3 (relay2 removed) off, new pin 6 claimed off then switched on, pin 7 claimed off
    assert b.log.index((2, 0)) < b.log.index((6, 1))
    assert (3, 0) in b.log
    assert b.levels == {2: 0, 3: 0, 6: 1, 7: 0}
    assert bank.states() == {"relay1": "on", "relay3": "off"}


def test_reload_into_interlock_keeps_one_on():
    groups = (((2, False), (3, False)),)
    b = Board(groups)
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure(cfg())
    fwtest.run(bank.set("relay1", "on"))
    fwtest.run(bank.set("relay2", "on"))
    bank.configure({"relay1": {"pin": 2, "interlock": "g"}, "relay2": {"pin": 3, "interlock": "g"}})
    assert bank.states() == {"relay1": "on", "relay2": "off"}
    assert b.levels == {2: 1, 3: 0}


def test_invalid_reload_changes_nothing():
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory)
    bank.configure(cfg())
    fwtest.run(bank.set("relay1", "on"))
    n = len(b.log)
    e = fwtest.raises(R.RelayError, bank.configure, {"relay1": {"pin": 2}, "x": {"pin": 2}})
    assert "relays.x.pin: GPIO2 already used by relay1" in str(e)
    assert len(b.log) == n and bank.states() == {"relay1": "on", "relay2": "off"}


def test_failsafe_and_on_change_reporting():
    seen = []
    b = Board()
    bank = R.RelayBank(pin_factory=b.factory, on_change=lambda n, s, c: seen.append((n, s, c)))
    bank.configure({"heater": {"pin": 2, "failsafe": "off"}, "fan": {"pin": 3, "failsafe": "on"},
                    "lamp": {"pin": 4}})
    fwtest.run(bank.set("heater", "on"))
    fwtest.run(bank.set("lamp", "on", cause="desired"))
    changed = fwtest.run(bank.apply_failsafe())
    assert sorted(changed) == ["fan", "heater"]
    assert bank.states() == {"heater": "off", "fan": "on", "lamp": "on"}
    assert seen == [("heater", "on", "local"), ("lamp", "on", "desired"), ("heater", "off", "failsafe"),
                    ("fan", "on", "failsafe")]
    assert bank.causes() == {"heater": "failsafe", "fan": "failsafe", "lamp": "desired"}


def test_every_switch_names_its_cause():
    seen = []
    bank = R.RelayBank(pin_factory=Board().factory, on_change=lambda n, s, c: seen.append((n, s, c)))

    async def go():
        bank.configure({"boiler": {"pin": 2, "power_on": "on", "max_on_s": 0.03}, "bell": {"pin": 3, "pulse_ms": 20},
                        "up": {"pin": 4, "interlock": "blind"}, "down": {"pin": 5, "interlock": "blind"}})
        assert seen == [("boiler", "on", "power_on")]
        assert bank.describe("boiler")["cause"] == "power_on" and bank.describe("bell")["cause"] is None
        await bank.set("bell", "on")
        await bank.set("up", "on", cause="desired")
        await bank.set("down", "on")
        await asyncio.sleep(0.1)
    fwtest.run(go())
    assert seen[1:5] == [("bell", "on", "local"), ("up", "on", "desired"), ("up", "off", "interlock"),
                         ("down", "on", "local")], seen
    assert sorted(seen[5:]) == [("bell", "off", "pulse"), ("boiler", "off", "max_on")], seen
    assert R.validate({"cause": {"pin": 2}}) == ["relays.cause: name reserved (a key of the reported state)"]


def test_on_change_failure_does_not_break_switching():
    def boom(n, s, c):
        raise RuntimeError("report failed")
    bank = R.RelayBank(pin_factory=Board().factory, on_change=boom)
    bank.configure(cfg())
    assert fwtest.run(bank.set("relay1", "on")) == "on"


def test_interlock_proved_on_simulated_pins():
    # The real hal.Pin of the simulated board: its transition log replays every level change, so an overlap that
    # lasted no time at all still shows.
    import picosim as sim
    b = sim.configure(flash_root=fwtest.tmpdir())
    b.max_pin_events = 4096
    bank = R.RelayBank()
    bank.configure({"up": {"pin": 2, "interlock": "blind"}, "down": {"pin": 3, "interlock": "blind"},
                    "lamp": {"pin": 4}})

    async def flip(name, n):
        for i in range(n):
            await bank.set(name, "on" if i % 3 else "toggle")
            await asyncio.sleep(0)

    async def go():
        await asyncio.gather(flip("up", 40), flip("down", 40), flip("lamp", 40))
    fwtest.run(go())
    assert len(b.events_of(2)) > 10 and len(b.events_of(3)) > 10  # both really switched, many times
    assert b.first_overlap((2, 3), level=1) is None
    assert b.pin_events_dropped == 0
    # and the log does catch an overlap when there is one: drive both on by hand
    b.drive(2, 1)
    b.drive(3, 1)
    assert b.first_overlap((2, 3), level=1) is not None

