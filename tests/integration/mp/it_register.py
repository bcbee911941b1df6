# Registration (protocol §2): AuthManager against the real ServiceDiscovery, with a key file from `picoiot provision`.
from iotlib.auth import AuthError
from it_device import Device, Recorder


async def refused(coro):
    try:
        await coro
    except AuthError as e:
        return str(e)
    raise AssertionError("registration was not refused")


async def main(ctl):
    p = ctl.ask("provision_cli")
    now = [1000000]
    dev = Device(p, clock=lambda: now[0])

    # 1. derived key from the key file → token, services, intervals
    rec = Recorder(dev.http)
    d = await dev.auth.register(rec)
    for name in ("config", "state", "heartbeat", "alarms", "ota", "refresh"):
        assert dev.auth.services.get(name, "").startswith("http://127.0.0.1:"), (name, dev.auth.services)
    assert dev.auth.namespace == "default" and d["device_id"] == p["device_id"]
    assert dev.auth.intervals["heartbeat"] == 10 and dev.auth.intervals["ttl"] == 35, dev.auth.intervals
    assert dev.token.count(".") == 2 and dev.auth.token_expires_in == 3600
    r = await dev.http.request("GET", dev.url("state"), headers=dev.auth.auth_header())
    assert r.status == 200, r.status  # the token opens the device's services
    rec_dev = ctl.ask("device")
    assert rec_dev["online"] and rec_dev["firmware"] == "0.1.0" and rec_dev["device_type"] == "relays", rec_dev
    assert rec_dev["reset_cause"] == "power_on" and rec_dev["key_mode"] == "derived", rec_dev

    # 2. a replayed registration (same nonce and signature) is refused
    method, url, body = rec.calls[-1]
    assert url.endswith("/register") and body["nonce"]
    r = await dev.http.request(method, url, json=body)
    assert r.status == 401 and r.json()["error"] == "unknown or expired nonce", (r.status, r.body)

    # 3. wrong key and unknown namespace: clear refusals that never show the key
    wrong = "0" * 64
    why = await refused(Device(p, key=wrong).register())
    assert "401" in why and "bad signature" in why and wrong not in why, why
    why = await refused(Device(p, namespace="nope").register())
    assert "challenge refused" in why and "404" in why and "unknown namespace" in why, why

    # 4. token refresh: explicit, then due by the clock (< 10 % of the lifetime left), then expired → re-register
    old = dev.token
    await dev.auth.refresh(dev.http)
    assert dev.auth.refreshes == 1 and dev.token.count(".") == 2
    now[0] += 3300 * 1000
    assert dev.auth.needs_refresh()
    await dev.auth.ensure_token(dev.http)
    assert dev.auth.refreshes == 2 and dev.auth.registrations == 1
    now[0] += 3700 * 1000
    await dev.auth.ensure_token(dev.http)
    assert dev.auth.registrations == 2, dev.auth.registrations
    r = await dev.http.request("GET", dev.url("state"), headers=dev.auth.auth_header())
    assert r.status == 200, r.status
    # a refresh with a token the server never signed is refused → ensure_token registers again
    dev.auth.token = old[:-4] + ("AAAA" if not old.endswith("AAAA") else "BBBB")
    now[0] += 3300 * 1000
    await dev.auth.ensure_token(dev.http)
    assert dev.auth.registrations == 3, dev.auth.registrations

    # 5. an individually registered key (random, stored by the server) works the same way
    q = ctl.ask("provision_individual")
    other = Device(q)
    await other.register()
    assert ctl.ask("device", device_id=q["device_id"])["key_mode"] == "individual"
    why = await refused(Device(q, key=p["device_key"]).register())
    assert "bad signature" in why, why
    return {"registrations": dev.auth.registrations, "refreshes": dev.auth.refreshes}
