"""The dashboard's fleet page with 1,000 devices, in Debian's chromium (Playwright), beside the same page with 10.

    .venv/bin/python bench/dashboard.py [--devices 1000] [--rounds 5]

A real `picoiot server` (SQLite) gets `--devices` devices enrolled through the API in namespace `default` and 10 in
namespace `small`; for each, a signed-in browser loads /ui/#/fleet `--rounds` times. The figure is the page's own
`performance.mark("fleet-rendered")` (set in the frame after the first full table is drawn), i.e. navigation start →
the devices and alarms fetched, the table built and painted. Median and worst of the rounds. Target (issue 14):
1,000 devices under 1 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from picoiot.procs import ServerChild  # noqa: E402
from picoiot.server.auth import issue_token  # noqa: E402
from picoiot.server.settings import Settings  # noqa: E402
from picoiot.server.ui.session import issue_ticket  # noqa: E402


def enroll(url: str, key: str, ns: str, n: int) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {issue_token(key, 'bench', ns, 'admin', 3600)}"},
                      timeout=30) as c:
        for i in range(n):
            r = c.post(f"/api/v1/namespaces/{ns}/devices", json={"device_id": f"dev-{i:05d}", "device_type":
                                                                 "sensors" if i % 2 else "relays",
                                                                 "group": f"g{i % 7}"})
            assert r.status_code == 201, r.text


def measure(browser, url: str, key: str, ns: str, rounds: int, expect: int) -> list[float]:
    ctx = browser.new_context(viewport={"width": 1920, "height": 1080}, base_url=url)
    page = ctx.new_page()
    page.goto(f"/ui/login?ticket={issue_ticket(key, 'bench', ns, 'viewer')}")
    page.wait_for_selector("#fleet tbody tr")
    out = []
    for _ in range(rounds):
        page.goto("/ui/#/fleet")
        page.reload()
        page.wait_for_selector("#fleet tbody tr")
        for _ in range(100):
            ms = page.evaluate("(performance.getEntriesByName('fleet-rendered')[0] || {}).startTime || 0")
            if ms:
                break
            page.wait_for_timeout(20)
        assert page.locator("#fleet tbody tr").count() == expect
        out.append(ms)
    ctx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    server = ServerChild(work, log=work / "server.log").start(60)
    try:
        settings = Settings.from_data_dir(work)
        key = settings.secrets.signing_key
        settings.secrets.add_namespace("small")
        enroll(server.url, key, "default", a.devices)
        enroll(server.url, key, "small", 10)
        from playwright.sync_api import sync_playwright
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            big = measure(b, server.url, key, "default", a.rounds, a.devices)
            small = measure(b, server.url, key, "small", a.rounds, 10)
            b.close()
        print(json.dumps({"devices": a.devices, "rounds": a.rounds,
                          "fleet_rendered_ms_median": round(statistics.median(big)), "fleet_rendered_ms_max":
                          round(max(big)), "baseline_10_devices_ms_median": round(statistics.median(small)),
                          "baseline_10_devices_ms_max": round(max(small))}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
