# State (protocol §4): StateManager against the real StateServer — full sync delivers an operator's desired state to
# the relay bank and reports it back; a 409 race is resolved; a blocking query is woken by an operator's change.
from iotlib.compat import asyncio
from iotlib.relays import RelayBank
from iotlib.state import StateManager
from it_device import Device, relay_delta_handler, BOARD_RELAYS


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    bank = RelayBank()
    bank.configure(BOARD_RELAYS)
    sm = StateManager(dev.http, dev.auth)
    deltas = []

    def record(delta):
        deltas.append(delta)
    sm.on_delta(record)
    sm.on_delta(relay_delta_handler(bank))

    # 1. desired set while the device was away → the full sync acts on it and reports back
    v = ctl.ask("set_desired", desired={"relay1": "on"})["version"]
    await sm.sync_full()
    assert deltas == [{"relay1": "on"}], deltas
    assert bank.state("relay1") == "on"
    assert sm.delta == {} and sm.reported.get("relay1") == "on", (sm.delta, sm.reported)
    assert sm.version == v + 1 and sm.pending() == []
    doc = ctl.ask("shadow")
    assert doc["state"]["delta"] == {} and doc["state"]["reported"] == {"relay1": "on"}, doc
    assert doc["version"] == sm.version

    # 2. a 409 race: the operator writes between the device's read and its report
    ctl.ask("set_desired", desired={"relay2": "on"})
    sm.report({"boot": 1})
    await sm.flush()
    assert sm.conflicts == 1, sm.conflicts
    assert bank.state("relay2") == "on"
    doc = ctl.ask("shadow")
    assert doc["state"]["reported"] == {"relay1": "on", "relay2": "on", "boot": 1}, doc
    assert doc["state"]["delta"] == {} and doc["version"] == sm.version, doc

    # 3. blocking query (?version=N&wait=S): held by the server until the operator's change wakes it
    ctl.ask("when_waiting", kind="state", then="set_desired", args={"desired": {"relay1": "off"}})
    changed = await asyncio.wait_for(sm.poll(30), 25)  # would be held 30 s if nothing woke it
    assert changed and bank.state("relay1") == "off"
    await sm.flush()
    doc = ctl.ask("shadow")
    assert doc["state"]["reported"]["relay1"] == "off" and doc["state"]["delta"] == {}, doc

    # 4. an update the server refuses (413: over its 8 KiB document limit) is dropped — only that field: a valid
    # report queued (and coalesced) with it still arrives
    sm.report({"blob": "x" * 9000})
    sm.report({"boot": 2})
    await sm.flush()
    assert sm.dropped == 1 and sm.pending() == [], (sm.dropped, sm.pending())
    doc = ctl.ask("shadow")
    assert doc["state"]["reported"]["boot"] == 2 and "blob" not in doc["state"]["reported"], doc
    return {"version": sm.version, "conflicts": sm.conflicts, "dropped": sm.dropped, "full_syncs": sm.full_syncs}
