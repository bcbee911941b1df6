"""Fleet operations benchmark: a 3-stage rollout over N simulated devices, and alert delivery latency, in one run.

    .venv/bin/python bench/rollout.py [--devices 200] [--soak 2] [--db sqlite|postgres]

A `picoiot server` process (its CPU time read from /proc) and N lightweight simulated devices in this process (one
asyncio task each, over HTTP: heartbeat every --interval s; when a heartbeat says `pending.ota`, the offer, the
signed manifest, the file in 4 KiB chunks, a re-registration (the install reset) and the `installed` report — the
firmware's sequence, without the interpreter).

Printed, each beside its baseline from the same run:
- rollout: wall time and the server's CPU share (CPU seconds ÷ wall seconds; 1.0 = one core) of a rollout in stages
  1 % → 25 % → 100 % with --soak s per stage, beside the same release taken to the same devices by one group
  assignment (no stages, no soak; the OTA service alone) and the stages' soak sum (the floor a rollout cannot beat);
- notifications: alarm POST → webhook receiver, p50/p99 over --alarms alarms sent while the rollout runs, beside a
  direct POST to the same receiver (the HTTP hop alone) and the configured grouping wait + evaluation tick.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from controlplane_load import CpuWatch, ServerProcess  # noqa: E402
from devicelib import machine, percentile  # noqa: E402

from picoiot import ota_cli  # noqa: E402
from picoiot.server.auth import derive_device_key, issue_token  # noqa: E402

NS = "default"
CHUNK = 4096


class Fleet:
    """N simulated devices doing the firmware's OTA sequence over HTTP."""

    def __init__(self, url: str, enrollment_key: str, n: int, interval: float):
        self.url, self.key, self.interval = url, enrollment_key, interval
        self.ids = [f"bro-{i:04d}" for i in range(n)]
        self.running = {d: "0.1.0" for d in self.ids}
        self.installed_at: dict[str, dict[str, float]] = {}
        self.tokens: dict[str, tuple[str, dict]] = {}
        self.errors = 0
        self.client = httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64))

    async def register(self, dev: str) -> None:
        r = await self.client.post("/api/devices/challenge", json={"device_id": dev, "namespace": NS})
        nonce = r.json()["nonce"]
        k = derive_device_key(self.key, dev)
        sig = hmac.new(k.encode(), f"{nonce}|{dev}".encode(), hashlib.sha256).hexdigest()
        r = await self.client.post("/api/devices/register", json={"device_id": dev, "nonce": nonce, "signature": sig,
                                                                  "firmware": self.running[dev]})
        r.raise_for_status()
        out = r.json()
        self.tokens[dev] = (out["token"], out["services"])

    async def install(self, dev: str) -> None:
        tok, svc = self.tokens[dev]
        h = {"Authorization": f"Bearer {tok}"}
        r = await self.client.get(svc["ota"], headers=h)
        if r.status_code != 200:
            return
        offer = r.json()
        doc = (await self.client.get(offer["manifest_url"], headers=h)).json()
        for f in json.loads(doc["manifest"])["files"]:
            got = 0
            while got < f["size"]:
                c = await self.client.get(f"{offer['files_url']}/{f['sha256']}", headers=h,
                                          params={"offset": got, "length": CHUNK})
                c.raise_for_status()
                got += len(c.content)
        self.running[dev] = offer["version"]
        await self.register(dev)  # the install reset
        tok, svc = self.tokens[dev]
        r = await self.client.post(svc["ota"] + "/report", headers={"Authorization": f"Bearer {tok}"},
                                   json={"version": offer["version"], "status": "installed"})
        r.raise_for_status()
        self.installed_at.setdefault(offer["version"], {})[dev] = time.monotonic()

    async def run_device(self, dev: str, stop: asyncio.Event) -> None:
        await asyncio.sleep(self.interval * (hash(dev) % 1000) / 1000)
        seq = 0
        while not stop.is_set():
            tok, svc = self.tokens[dev]
            try:
                r = await self.client.post(svc["heartbeat"], headers={"Authorization": f"Bearer {tok}"},
                                           json={"seq": seq, "firmware": self.running[dev]})
                seq += 1
                if r.status_code == 200 and r.json()["pending"].get("ota"):
                    await self.install(dev)
            except httpx.HTTPError:
                self.errors += 1
            await asyncio.sleep(self.interval)


class Receiver:
    """A webhook receiver recording when each alarm key first arrived."""

    def __init__(self):
        self.arrived: dict[str, float] = {}
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.monotonic()
                for a in body.get("alerts", []):
                    if a["status"] == "firing":
                        rec.arrived.setdefault(a["labels"].get("alarm", ""), now)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def publish(url: str, token: str, workdir: Path, version: str, size: int) -> None:
    key = workdir / "ota.key"
    if not key.exists():
        ota_cli.set_key(url, token, NS, ota_cli.keygen(key))
    d = workdir / f"rel-{version}"
    d.mkdir()
    (d / "app.bin").write_bytes(os.urandom(size))
    ota_cli.publish(url, token, NS, d, version, key)


async def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        await asyncio.sleep(0.1)


async def main_async(args, srv: ServerProcess, workdir: Path) -> None:
    secrets = json.loads((srv.data_dir / "secrets.json").read_text())
    admin = issue_token(secrets["signing_key"], "bench", NS, "admin", 7200)
    api = httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    fleet = Fleet(srv.url, srv.enrollment_key, args.devices, args.interval)
    t0 = time.monotonic()
    for i in range(0, len(fleet.ids), 20):
        await asyncio.gather(*(fleet.register(d) for d in fleet.ids[i:i + 20]))
    print(f"registered {args.devices} devices in {time.monotonic() - t0:.1f} s")
    (await api.put(f"/api/v1/namespaces/{NS}/groups/bench", json={"overrides": {}})).raise_for_status()
    for d in fleet.ids:
        (await api.patch(f"/api/v1/namespaces/{NS}/devices/{d}", json={"group": "bench"})).raise_for_status()
    await asyncio.to_thread(publish, srv.url, admin, workdir, "1.0.1", args.file_bytes)
    await asyncio.to_thread(publish, srv.url, admin, workdir, "1.0.2", args.file_bytes)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(fleet.run_device(d, stop)) for d in fleet.ids]
    await asyncio.sleep(2 * args.interval)

    # baseline: one group assignment, no stages
    with CpuWatch(srv.pid, args.db == "postgres") as base:
        (await api.put(f"/api/v1/namespaces/{NS}/ota/assignments", json={"version": "1.0.1", "group": "bench"})
         ).raise_for_status()

        async def all_base():
            return len(fleet.installed_at.get("1.0.1", {})) == args.devices
        await wait_for(all_base, 600, "baseline assignment")
    # the rollout takes the devices' own assignments; the group's stays (a device's own wins)
    rcv = Receiver()
    (await api.put(f"/api/v1/namespaces/{NS}/alerting/receivers/bench",
                   json={"kind": "webhook", "url": rcv.url, "secret": os.urandom(16).hex()})).raise_for_status()
    (await api.put(f"/api/v1/namespaces/{NS}/alerting/rules/bench",
                   json={"event": "alarm", "key_pattern": "bench_*", "receivers": ["bench"]})).raise_for_status()
    stages = [{"percent": 1, "soak_s": args.soak}, {"percent": 25, "soak_s": args.soak},
              {"percent": 100, "soak_s": args.soak}]
    sent: dict[str, float] = {}

    # the alarms come from a device outside the rollout (a device's token changes when it re-registers)
    dev = "bro-alarms"
    fleet.running[dev] = "0.1.0"
    await fleet.register(dev)

    async def alarms():
        for i in range(args.alarms):
            tok, svc = fleet.tokens[dev]
            key = f"bench_{i}"
            sent[key] = time.monotonic()
            r = await fleet.client.post(svc["alarms"], headers={"Authorization": f"Bearer {tok}"},
                                        json={"alarms": [{"key": key, "severity": "warning", "state": "firing"}]})
            if r.status_code != 200:
                raise SystemExit(f"alarm POST: HTTP {r.status_code} {r.text[:200]}")
            await asyncio.sleep(args.alarm_gap)
    with CpuWatch(srv.pid, args.db == "postgres") as roll:
        r = await api.post(f"/api/v1/namespaces/{NS}/ota/rollouts", json={
            "version": "1.0.2", "target": {"group": "bench"}, "stages": stages, "failure_threshold": 0.1})
        r.raise_for_status()
        rid = r.json()["id"]
        alarm_task = asyncio.create_task(alarms())

        async def done():  # the summary, twice a second: the bench must not load the server it measures
            await asyncio.sleep(0.4)
            x = next(y for y in (await api.get(f"/api/v1/namespaces/{NS}/ota/rollouts")).json()["rollouts"]
                     if y["id"] == rid)
            if x["state"] not in ("running", "completed"):
                raise SystemExit(f"rollout {x['state']}: {x['reason']}")
            return x["state"] == "completed"
        await wait_for(done, 900, "rollout")
    await alarm_task  # may outlast the rollout: not part of its time
    detail = (await api.get(f"/api/v1/namespaces/{NS}/ota/rollouts/{rid}")).json()
    # where the time went: each stage's last commit, from the rollout's start (server clock)
    ends = [max(d["status_ts"] for d in detail["devices"] if d["stage"] == i) - detail["created_ts"]
            for i in range(len(stages))]
    await wait_for(lambda: asyncio.sleep(0, result=len(rcv.arrived) >= args.alarms), 60, "notifications")
    stop.set()
    await asyncio.gather(*tasks)
    # baseline of the notification path: the same receiver, POSTed directly
    direct = []
    async with httpx.AsyncClient(timeout=10) as c:
        for i in range(args.alarms):
            t = time.monotonic()
            await c.post(rcv.url, json={"alerts": []})
            direct.append(time.monotonic() - t)
    lat = [rcv.arrived[k] - sent[k] for k in sent if k in rcv.arrived]
    ms = lambda v: f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"  # noqa: E731
    soak_floor = 3 * args.soak
    print(f"rollout 1% → 25% → 100%, soak {args.soak:g} s per stage, {args.devices} devices, heartbeat "
          f"{args.interval:g} s, {args.db}:")
    print(f"  rollout:        {roll.wall:6.1f} s, server CPU {roll.server:.2f} of a core"
          + (f", PostgreSQL {roll.pg:.2f}" if args.db == "postgres" else "") + f", machine {roll.machine:.2f}")
    print("  stage ends:     " + ", ".join(f"{e / 1000:.1f} s" for e in ends) + " after the start; "
          "stage sizes " + ", ".join(str(x["devices"]) for x in detail["stage_detail"]))
    print(f"  baseline:       {base.wall:6.1f} s, server CPU {base.server:.2f} of a core (one group assignment, "
          f"no stages)" + (f", PostgreSQL {base.pg:.2f}" if args.db == "postgres" else ""))
    print(f"  soak floor:     {soak_floor:6.1f} s (3 stages × soak)")
    print(f"notifications, alarm POST → webhook receiver, {len(lat)} alarms every {args.alarm_gap:g} s during the "
          f"rollout: p50 {ms(percentile(lat, 50))}, p99 {ms(percentile(lat, 99))}")
    print(f"  baseline direct POST to the receiver: p50 {ms(percentile(direct, 50))}, p99 {ms(percentile(direct, 99))};"
          f" configured floor: group wait {args.group_wait:g} s + tick ≤ {args.tick:g} s")
    print(f"  device HTTP errors: {fleet.errors}")
    await api.aclose()
    await fleet.client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--interval", type=float, default=1.0, help="heartbeat interval of the simulated devices, s")
    ap.add_argument("--soak", type=float, default=2.0, help="soak per stage, s")
    ap.add_argument("--file-bytes", type=int, default=8192, help="size of the release's one file")
    ap.add_argument("--alarms", type=int, default=100)
    ap.add_argument("--alarm-gap", type=float, default=0.1, help="seconds between two alarms")
    ap.add_argument("--tick", type=float, default=0.2, help="the server's --fleet-tick")
    ap.add_argument("--group-wait", type=float, default=0.0, help="the server's --alert-group-wait")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    args = ap.parse_args()
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        workdir = Path(tmp)
        srv = ServerProcess(args.db, workdir, workdir / "server.log",
                            extra=("--fleet-tick", str(args.tick), "--alert-group-wait", str(args.group_wait),
                                   "--log-level", "warning"))
        try:
            asyncio.run(main_async(args, srv, workdir))
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
