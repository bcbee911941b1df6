"""Cloud to relay: from an operator's desired-state write to the simulated pin's transition, p50/p99/max.

A real `picoiot server` (SQLite, or --db URL) and RelaysControllers under the unix micropython (.mpy, bench/mp/
c2r_device.py: main_sim plus a log of every pin transition stamped with the wall clock, the clock the write is
stamped with). Scenarios:
  one      one device, --trials writes one after another (on/off alternately)
  fleet    --devices devices, --rounds rounds in which every device gets a write at once
  baseline one heartbeat-paced device (the long-poll off: what the firmware did before), --baseline-trials writes
The latency of a write is (pin transition time) − (time just before the operator's POST). Target on loopback:
p50 < 100 ms, p99 < 250 ms.

    .venv/bin/python bench/cloud_to_relay.py                       # 1 device, 100 devices, the baseline
    .venv/bin/python bench/cloud_to_relay.py --devices 10 --rounds 3 --trials 10 --baseline-trials 3   # quick
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from picoiot import build, paths  # noqa: E402
from picoiot.procs import (DeviceChild, ServerChild, device_settings, ensure_bundle, free_port,  # noqa: E402
                           provision_over_api)

BUNDLE = paths.REPO / "build" / "bench-c2r"
SCRIPTS = paths.REPO / "build" / "bench-c2r-scripts"
PIN = 2  # relay1 on the control plane's default config
TARGET_P50_MS, TARGET_P99_MS = 100, 250


def proc_cpu(pid) -> float:
    """CPU seconds (user + system) a process has used; 0 when it is gone."""
    import os
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return 0.0


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="picoiot-c2r-"))
        self.server = ServerChild(self.tmp / "cp", db=args.db, extra=("--heartbeat-flush", "1"))
        self.devices: list[dict] = []
        self.lost = 0
        self.ports: set[int] = set()

    def start_server(self):
        self.server.start()
        from picoiot.server.auth import issue_token
        from picoiot.server.settings import Settings
        key = Settings.from_data_dir(self.server.data_dir).secrets.signing_key
        self.admin = issue_token(key, "bench", "default", "admin", 7200)
        self.operator = issue_token(key, "bench", "default", "operator", 7200)

    def add_device(self, name: str, longpoll: bool = True) -> dict:
        a = self.args
        key = provision_over_api(self.server.url, self.admin, name, "relays", "default",
                                 overrides={"heartbeat_interval_s": a.interval, "time": {"servers": []}})
        port = free_port()
        while port in self.ports:  # free_port only asks the OS: two devices of this run must not get the same one
            port = free_port()
        self.ports.add(port)
        settings = device_settings(self.tmp / f"{name}.json", key, "relays", port, self.tmp / f"{name}.flash")
        if not longpoll:
            s = json.loads(settings.read_text())
            s["longpoll"] = False
            settings.write_text(json.dumps(s))
        child = DeviceChild(settings, runtime=a.runtime, heap=a.heap, bundle=BUNDLE, log=self.tmp / f"{name}.log",
                            entry="c2r_device",
                            extra_path=SCRIPTS if a.runtime == "micropython" else REPO / "bench" / "mp")
        d = {"id": name, "child": child, "pins": self.tmp / f"{name}.flash" / "pins.json", "state": "off"}
        self.devices.append(d)
        return d

    def pin_events(self, d) -> list:
        try:
            return json.loads(d["pins"].read_text())
        except (OSError, ValueError):
            return []

    async def write(self, client: httpx.AsyncClient, d: dict, state: str) -> float:
        t0 = time.time() * 1000
        r = await client.post(f"/api/v1/namespaces/default/devices/{d['id']}/shadows/default",
                              json={"state": {"desired": {"relay1": state}}})
        if r.status_code != 200:
            raise RuntimeError(f"write for {d['id']}: {r.status_code} {r.text}")
        return t0

    async def wait_pin(self, d: dict, level: int, t0: float, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for ts, pin, lv in self.pin_events(d):
                if pin == PIN and lv == level and ts >= t0 - 5:  # clock read granularity
                    return ts - t0
            await asyncio.sleep(0.005)
        print(f"# {d['id']}: pin {PIN} did not go to {level} within {timeout_s:.0f} s (log {d['child'].log})",
              flush=True)
        self.lost += 1
        return None

    def cpu(self, devs: list[dict]) -> tuple[float, float]:
        """CPU seconds used so far by these devices' interpreters and by the server."""
        return sum(proc_cpu(d["child"].pid) for d in devs), proc_cpu(self.server.pid)

    async def trials(self, devs: list[dict], rounds: int, timeout_s: float, pause=(0.2, 0.5)) -> list[float]:
        """Latencies of every write; self.spent[...] also gets, per round, the CPU seconds the devices and the
        server used from the writes until the last pin moved, the writes' own latency (ms) and the round's wall."""
        out = []
        self.spent = {"devices": [], "server": [], "write_ms": [], "wall": []}
        async with httpx.AsyncClient(base_url=self.server.url, timeout=30, limits=httpx.Limits(max_connections=64),
                                     headers={"Authorization": f"Bearer {self.operator}"}) as c:
            for _ in range(rounds):
                async def one(d):
                    d["state"] = "on" if d["state"] == "off" else "off"
                    t0 = await self.write(c, d, d["state"])
                    self.spent["write_ms"].append(time.time() * 1000 - t0)
                    return await self.wait_pin(d, 1 if d["state"] == "on" else 0, t0, timeout_s)
                dev0, srv0 = self.cpu(devs)
                w0 = time.monotonic()
                out += [x for x in await asyncio.gather(*(one(d) for d in devs)) if x is not None]
                dev1, srv1 = self.cpu(devs)
                self.spent["devices"].append(dev1 - dev0)
                self.spent["server"].append(srv1 - srv0)
                self.spent["wall"].append(time.monotonic() - w0)
                await asyncio.sleep(random.uniform(*pause))
        return out

    def stop(self):
        for d in self.devices:
            d["child"].stop()
        self.server.stop()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def row(name: str, lat: list[float], note: str = "") -> str:
    return (f"{name:<34} {len(lat):>5} {pct(lat, 50):>9.1f} {pct(lat, 99):>9.1f} {max(lat):>9.1f}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100, help="devices of the fleet scenario")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the fleet scenario (one write per device each)")
    ap.add_argument("--trials", type=int, default=30, help="writes of the one-device scenario")
    ap.add_argument("--baseline-trials", type=int, default=5, help="writes to the heartbeat-paced device (0: none)")
    ap.add_argument("--interval", type=int, default=10, help="heartbeat interval of every device (s)")
    ap.add_argument("--runtime", default="micropython", choices=("micropython", "cpython"))
    ap.add_argument("--heap", default="320K", help="micropython heap per device")
    ap.add_argument("--db", default=None, help="control-plane database URL (default: SQLite)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = ap.parse_args()

    if a.runtime == "micropython":
        ensure_bundle(BUNDLE)
        build.compile_tree(REPO / "bench" / "mp", SCRIPTS)
    b = Bench(a)
    many_cpu = None
    try:
        b.start_server()
        fleet = [b.add_device(f"c2r-{i:03d}") for i in range(max(1, a.devices))]
        base = b.add_device("c2r-heartbeat-paced", longpoll=False) if a.baseline_trials else None
        t = time.monotonic()
        for i, d in enumerate(fleet + ([base] if base else [])):
            d["child"].start()
            if i % 8 == 7:  # a few at a time: booting is CPU-heavy, the box has 2 cores
                d["child"].wait_ready(120)
        for d in fleet + ([base] if base else []):
            d["child"].wait_ready(180)
        time.sleep(1)
        dead = [d["id"] for d in fleet + ([base] if base else []) if d["child"].poll() is not None]
        if dead:
            raise SystemExit(f"devices exited after start (port taken by another process?): {dead}")
        print(f"# {len(fleet)} long-polling devices + {1 if base else 0} heartbeat-paced, heartbeat every "
              f"{a.interval} s, {a.runtime} {a.heap}; ready after {time.monotonic() - t:.0f} s", flush=True)
        time.sleep(2 * a.interval / 10 + 1)  # let every device settle into its poll
        one = asyncio.run(b.trials(fleet[:1], a.trials, 3 * a.interval + 10))
        many = asyncio.run(b.trials(fleet, a.rounds, 3 * a.interval + 10, pause=(0.5, 1.0))) if a.devices > 1 else []
        many_cpu = b.spent if a.devices > 1 else None
        paced = asyncio.run(b.trials([base], a.baseline_trials, 3 * a.interval + 10)) if base else []
    finally:
        b.stop()
    print(f"{'scenario (ms, write → pin)':<34} {'n':>5} {'p50':>9} {'p99':>9} {'max':>9}")
    print(row("one device, long-poll", one, f"target p50 < {TARGET_P50_MS}, p99 < {TARGET_P99_MS}"))
    if many:
        print(row(f"{len(fleet)} devices at once, long-poll", many))
    if paced:
        print(row("baseline: heartbeat-paced device", paced, f"heartbeat every {a.interval} s"))
    if many_cpu and many_cpu["wall"]:
        import os
        n, rounds = len(fleet), len(many_cpu["wall"])
        dev_ms = sum(many_cpu["devices"]) / (n * rounds) * 1000
        srv_ms = sum(many_cpu["server"]) / (n * rounds) * 1000
        floor = (sum(many_cpu["devices"]) + sum(many_cpu["server"])) / rounds / (os.cpu_count() or 1)
        print(f"where the {n}-device rounds went: per write, the devices' interpreters used {dev_ms:.1f} ms CPU and "
              f"the server {srv_ms:.1f} ms; the operator's POST took p50 {pct(many_cpu['write_ms'], 50):.0f} ms, "
              f"p99 {pct(many_cpu['write_ms'], 99):.0f} ms. A round ({n} writes at once) needs at least "
              f"{floor:.2f} s of the machine's {os.cpu_count()} cores for that CPU alone; it lasted "
              f"{sum(many_cpu['wall']) / rounds:.2f} s (mean of {rounds})")
    ok = pct(one, 50) < TARGET_P50_MS and pct(one, 99) < TARGET_P99_MS and (
        not many or (pct(many, 50) < TARGET_P50_MS and pct(many, 99) < TARGET_P99_MS))
    if b.lost:
        print(f"writes not applied within {3 * a.interval + 10} s: {b.lost}")
    print("targets: " + ("met" if ok and not b.lost else "MISSED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
