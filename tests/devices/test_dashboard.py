"""The dashboard (/ui/) in a real browser — Playwright driving Debian's chromium (installed by ./dev test) — against
the real `picoiot server` and simulated devices running the firmware under micropython (devtest.py).

Screenshots of the fleet and device pages go to build/screenshots/ (the README's come from there)."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from devtest import NS, wait_until
from picoiot import paths
from picoiot.server.auth import issue_token
from picoiot.server.ui.session import issue_ticket

CHROMIUM = os.environ.get("PICOIOT_CHROMIUM", "/usr/bin/chromium")
SHOTS = paths.REPO / "build" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("PICOIOT_REQUIRE_ALL"):
            pytest.fail(f"{CHROMIUM} missing: ./dev test installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (./dev test installs it)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def relays(device_factory):
    return device_factory("relays", pinlog=True)


@pytest.fixture(scope="module")
def sensors(device_factory):
    return device_factory("sensors")


def _token(cp, role, sub=None, ttl=600):
    return issue_token(cp.secrets.signing_key, sub or f"ui-{role}", NS, role, ttl)


def sign_in(browser, cp, role, width=1280):
    """A fresh browser context signed in by pasting a token into the form."""
    ctx = browser.new_context(viewport={"width": width, "height": 900}, base_url=cp.url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("/ui/")
    page.fill("#token", _token(cp, role))
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#fleet tbody tr")
    page.js_errors = errors
    return ctx, page


def _api_from_page(page, method, path, body=None):
    """A write the page's own script could make (same origin, the session cookie): what the API answers."""
    return page.evaluate("""async ([m, p, b]) => { const r = await fetch(p, {method: m, credentials: 'same-origin',
        headers: {'Content-Type': 'application/json'}, body: b === null ? undefined : JSON.stringify(b)});
        return r.status; }""", [method, path, body])


def test_each_role_sees_and_may_do_what_the_api_allows(browser, cp, relays):
    shadow = f"/api/v1/namespaces/{NS}/devices/{relays.id}/shadows/default"
    for role, can_switch, can_configure in (("viewer", False, False), ("operator", True, False),
                                            ("admin", True, True)):
        ctx, page = sign_in(browser, cp, role)
        assert page.text_content("#who") == f"ui-{role} · {role}"
        page.goto(f"/ui/#/device/{relays.id}")
        page.wait_for_selector("#card-relays [data-relay=relay1]")
        assert (page.locator("#card-relays button[role=switch]").count() > 0) is can_switch
        assert (page.locator("#save-config").count() > 0) is can_configure
        # the page only hides; the API decides: a viewer's write from the page is refused
        status = _api_from_page(page, "POST", shadow, {"state": {"desired": {"relay2": "off"}}})
        assert status == (200 if can_switch else 403)
        assert _api_from_page(page, "PUT", f"/api/v1/namespaces/{NS}/devices/{relays.id}/config",
                              {"overrides": {}}) == (200 if can_configure else 403)
        assert page.js_errors == []
        ctx.close()
    # each write went into the audit log under the page's subject, via the dashboard
    audit = cp.call("GET", f"/api/v1/namespaces/{NS}/audit", "viewer", params={"device": relays.id})["entries"]
    mine = [(e["sub"], e["role"], e["method"], e["status"]) for e in audit if e["via"] == "ui"]
    assert ("ui-viewer", "viewer", "POST", 403) in mine and ("ui-operator", "operator", "POST", 200) in mine
    assert ("ui-admin", "admin", "PUT", 200) in mine and ("ui-operator", "operator", "PUT", 403) in mine


def test_one_time_link_forged_and_expired_sessions_and_other_origins(browser, cp):
    ctx = browser.new_context(base_url=cp.url)
    page = ctx.new_page()
    link = f"/ui/login?ticket={issue_ticket(cp.secrets.signing_key, 'link-user', NS, 'operator')}"
    page.goto(link)
    page.wait_for_selector("#fleet")
    assert page.text_content("#who") == "link-user · operator"
    cookie = next(c for c in ctx.cookies() if c["name"] == "picoiot_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    # the link works once
    again = httpx.get(cp.url + link, follow_redirects=False)
    assert again.status_code == 401 and again.json()["error"] == "login link already used"
    # a write with the session from another origin is refused (CSRF), even with a valid cookie
    jar = {"picoiot_session": cookie["value"]}
    path = f"{cp.url}/api/v1/namespaces/{NS}/alarms/999999999/ack"  # none such, whatever ran on this server before
    r = httpx.post(path, cookies=jar, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"] == "cross-origin request refused"
    assert httpx.post(path, cookies=jar).status_code == 403  # no Origin, no Referer
    assert httpx.post(path, cookies=jar, headers={"Origin": cp.url}).status_code == 404  # same origin: passes
    # and a page on another site cannot even make the browser send the cookie (SameSite=Strict): the server sees
    # an anonymous request and answers 401 (counted in its metrics)
    route = 'method="POST",route="/api/v1/namespaces/{ns}/alarms/{alarm_id}/ack",status="401"'

    def refused() -> float:
        for line in httpx.get(cp.url + "/metrics").text.splitlines():
            if line.startswith(f"picoiot_http_requests_total{{{route}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    n = refused()
    page.goto(cp.url.replace("127.0.0.1", "localhost") + "/health")  # another site, no CSP of ours
    page.evaluate("""async (u) => { try { await fetch(u, {method: 'POST', credentials: 'include', mode: 'no-cors'}); }
        catch (e) {} }""", path)
    wait_until(lambda: refused() == n + 1, 10, "the cross-site request to arrive without the cookie")
    ctx.close()
    # forged and expired sessions are refused like forged and expired tokens, and the page asks to sign in
    for value, error in ((_token(cp, "admin")[:-4] + "AAAA", "invalid token"),
                         (issue_token("not-the-server-key-" + "0" * 32, "x", NS, "admin", 600), "invalid token"),
                         (issue_token(cp.secrets.signing_key, "x", NS, "admin", -10), "token expired")):
        r = httpx.get(f"{cp.url}/ui/me", cookies={"picoiot_session": value})
        assert r.status_code == 401 and r.json()["error"] == error
        ctx = browser.new_context(base_url=cp.url)
        ctx.add_cookies([{"name": "picoiot_session", "value": value, "url": cp.url}])
        page = ctx.new_page()
        page.goto("/ui/")
        page.wait_for_selector("#login:not([hidden])")
        assert page.locator("#fleet").count() == 0
        ctx.close()


def test_switch_a_relay_from_the_page_and_the_pin_follows(browser, cp, relays):
    ctx, page = sign_in(browser, cp, "operator")
    page.goto(f"/ui/#/device/{relays.id}")
    sw = page.locator("#card-relays button[data-relay=relay1]")
    sw.wait_for()
    before = sw.get_attribute("aria-checked")
    want = "off" if before == "true" else "on"
    sw.focus()
    page.keyboard.press("Enter")  # by keyboard
    # the simulated board's pin log shows the relay's pin at the new level…
    level = 1 if want == "on" else 0
    pin = cp.config(relays.id)["config"]["relays"]["relay1"]["pin"]

    def pin_level():
        last = None
        for _, p, lv in relays.pinlog()["events"]:
            if p == pin:
                last = lv
        return last == level
    try:
        wait_until(pin_level, 30, f"relay1's pin to go to {level}")
    except AssertionError:
        raise AssertionError(f"pin log {relays.pinlog()}, shadow {cp.shadow(relays.id)}, "
                             f"device says {relays.relays()}") from None
    # …and the switch shows what the device reports, pushed to the page (no reload)
    page.wait_for_selector(f"#card-relays button[data-relay=relay1][aria-checked={str(want == 'on').lower()}]",
                           timeout=30_000)
    assert relays.relays()["relay1"] == want
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "device-relays.png"), full_page=True)
    ctx.close()


def test_sensor_values_and_the_chart_fill_from_telemetry(browser, cp, sensors):
    ctx, page = sign_in(browser, cp, "viewer")
    page.goto(f"/ui/#/device/{sensors.id}")
    page.wait_for_selector("#card-values [data-field]", timeout=30_000)
    page.wait_for_selector("#chart canvas", timeout=30_000)
    first = int(page.get_attribute("#chart", "data-points") or 0)
    # readings keep arriving on the sensors device's heartbeats and are pushed to the chart
    wait_until(lambda: int(page.get_attribute("#chart", "data-points") or 0) >= first + 3, 30, "the chart to grow")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "device.png"), full_page=True)
    # the same series through the API
    field = page.get_attribute("#card-values [data-field]", "data-field")
    series = cp.call("GET", f"/api/v1/namespaces/{NS}/devices/{sensors.id}/telemetry", "viewer",
                     params={"field": field})
    assert series["points"] and series["source"] == "raw"
    # usable on a phone: nothing wider than the screen but the scrollable tables
    page.set_viewport_size({"width": 375, "height": 800})
    wait_until(lambda: page.evaluate("document.querySelector('#chart canvas').getBoundingClientRect().width") <= 375,
               10, "the chart to be redrawn for the narrow screen")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(SHOTS / "device-375.png"), full_page=True)
    assert page.js_errors == []
    ctx.close()


def test_offline_and_back_and_an_alarm_acknowledged_live(browser, cp, relays, sensors):
    ctx, page = sign_in(browser, cp, "operator")
    row = f"#fleet tr[data-device='{relays.id}'] td.state"
    page.wait_for_selector(f"{row}:text-is('online')", timeout=30_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)
    relays.stop()
    try:
        page.wait_for_selector(f"{row}:text-is('offline')", timeout=60_000)  # pushed: no reload
        # the offline alarm appears live on the alarms page, and is acknowledged from it
        page.click("nav a[href='#/alarms']")
        ack = page.locator(f"#alarms-open tr:has-text('{relays.id}'):has-text('device_offline') button[data-ack]")
        ack.wait_for(timeout=30_000)
        ack.click()
        page.wait_for_selector(f"#alarms-acked tr:has-text('{relays.id}'):has-text('acknowledged by ui-operator')",
                               timeout=30_000)
    finally:
        relays.start()
    page.click("nav a[href='#/fleet']")
    page.wait_for_selector(f"{row}:text-is('online')", timeout=60_000)
    # and its offline alarm is cleared
    page.click("nav a[href='#/alarms']")
    page.wait_for_selector(f"#alarms-cleared tr:has-text('{relays.id}'):has-text('device_offline')", timeout=30_000)
    ctx.close()


def test_html_in_names_and_alarm_text_is_shown_as_text(browser, cp):
    evil_group = "<img src=x onerror=window.__xss=1>"
    evil_msg = "<script>window.__xss=2</script><b>bold?</b>"
    from picoiot.procs import provision_over_api
    key = provision_over_api(cp.url, cp.token(), "dashboard-xss", "sensors", NS)
    # the device's own protocol: register, then report an alarm with HTML in its text
    import hashlib
    import hmac
    with httpx.Client(base_url=cp.url, timeout=10) as c:
        nonce = c.post("/api/devices/challenge", json={"device_id": "dashboard-xss", "namespace": NS}).json()["nonce"]
        sig = hmac.new(key["device_key"].encode(), f"{nonce}|dashboard-xss".encode(), hashlib.sha256).hexdigest()
        reg = c.post("/api/devices/register", json={"device_id": "dashboard-xss", "namespace": NS, "nonce": nonce,
                                                    "signature": sig, "device_type": "sensors"}).json()
        r = c.post(reg["services"]["alarms"], headers={"Authorization": f"Bearer {reg['token']}"},
                   json={"alarms": [{"key": "x", "severity": "error", "message": evil_msg}]})
        assert r.status_code == 200
    cp.call("PATCH", f"/api/v1/namespaces/{NS}/devices/dashboard-xss", json={"group": evil_group})
    ctx, page = sign_in(browser, cp, "viewer")
    page.wait_for_selector(f"#fleet tr[data-device='dashboard-xss'] td:text-is('{evil_group}')")
    page.click("nav a[href='#/alarms']")
    cell = page.locator("#alarms-open tr:has-text('dashboard-xss') td.message")
    cell.wait_for()
    assert cell.text_content() == evil_msg
    assert cell.locator("script, b").count() == 0
    page.goto("/ui/#/device/dashboard-xss")
    page.wait_for_selector("#card-alarms td.message")
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src=x]").count() == 0
    ctx.close()
    c.close()
