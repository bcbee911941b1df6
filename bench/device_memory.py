"""Minimum MicroPython heap (`-X heapsize`) at which each controller completes issue 4's standard scenario, beside
microdot's hello world measured in the same run, counted the way a Pico W holds the code (board-equivalent):

  mpy   — the board code (iotlib and the controller) as .mpy files loaded into the heap: stock Pico W firmware
          plus `mpremote cp`. The board-equivalent figure.
  romfs — the board code in a ROMFS image, run in place (a Pico W with the code in its ROM partition, or frozen).

In both modes the simulated board (picosim, and main_sim that starts it) is test equipment that a Pico W has built in
(`machine`, `network`): it runs in place from a ROMFS image of its own (mpy: build/…/sim.img; romfs: inside
romfs.img), mounted by firmware/boot_romfs.py from one buffer allocated first. Every figure printed is the heap minus
that image (the image stands in for flash), i.e. what the board's 192K must hold. The interpreter is the pinned unix
micropython (64-bit), or --micropython PATH (e.g. a 32-bit build: the size of a Pico W's objects); its version and word
size are printed first.

The scenario (one real `picoiot server` per run, on 127.0.0.1; a fresh device each run):
  register (challenge-response) → config fetched and applied (GET /ready = 200) → 200 authenticated API requests
  (2 at a time; the kind's own endpoints, /info, /health, /metrics, relay switching) with a few refusals the scenario
  asks for (401, 404) → a hot-reloaded config → an alarm raised and delivered to the control plane (relays: control
  plane stopped until the failsafe fires, then restarted; sensors: the BME280 moved to an absent I2C address) →
  heartbeats seen by the control plane. Sensors additionally: 3 WebSocket clients receiving frames for --ws-seconds
  (default 30) after the requests (the 3 clients hold every connection the device serves at once). A run passes when every answer is the one asked for, every WebSocket client got
  frames throughout, the alarm arrived, the process is alive and no MemoryError was printed.

    .venv/bin/python bench/device_memory.py                       # both kinds, both modes, hello world
    .venv/bin/python bench/device_memory.py --kind sensors --mode romfs --ws-seconds 5
    .venv/bin/python bench/device_memory.py --once 192 --ws-seconds 3   # one run per kind/mode at 192K, no bisection
    .venv/bin/python bench/device_memory.py --micropython PATH --kind relays --mode mpy --step 4 --ota

With --ota each run ends with an OTA update of the complete board bundle (every file of `picoiot firmware build`,
signed, published and assigned through the real control plane): the device must download, verify, install, reboot
into trial and commit it at the heap under test. After each minimum, one more run at 192K reports the largest free
block (GET /metrics, iotlib_heap_largest_free_block_bytes) and the lowest values since boot: TLS on a Pico W needs
one contiguous ~24K block (mbedTLS's 16K + 4K record buffers and the handshake).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heaplib  # noqa: E402

from picoiot import build, paths  # noqa: E402
from picoiot.procs import DeviceChild, ServerChild, device_settings, free_port, provision_over_api  # noqa: E402
from picoiot.server.auth import device_local_token, issue_token  # noqa: E402

BUNDLE = heaplib.REPO / "build" / "device-memory"
NS = "default"
BASE_CONFIG = {"heartbeat_interval_s": 1, "time": {"servers": []}, "api": {"rate_per_s": 500, "burst": 500}}
_ids = itertools.count(1)
VERBOSE = False
TRACE = False
TLS_RESERVE = False


def note(msg: str) -> None:
    if VERBOSE:
        print("   ", msg, flush=True)


class Failed(Exception):
    pass


#: Budgets of issue 11 (KiB, 32-bit, board-equivalent): (mpy, romfs) per kind; the moonshot is 128K for both in mpy.
BUDGET_K = {"relays": (144, 96), "sensors": (160, 96)}
#: The least a TLS session's record buffers take in one piece (bytes; HTTPClient.tls_reserve_min)
TLS_MIN = 20 * 1024
OTA_VERSION = "9.9.9-bench"


def image(mode: str) -> Path:
    """The ROMFS image boot_romfs mounts: the simulator alone (mpy), or the simulator and the board code (romfs)."""
    return BUNDLE / ("romfs.img" if mode == "romfs" else "sim.img")


def image_k(mode: str = "romfs") -> int:
    return math.ceil(image(mode).stat().st_size / 1024)


def counted(mode: str) -> str:
    if mode == "mpy":
        return (f"board code (iotlib, controller) as .mpy in the heap; the simulator in place from its own "
                f"ROMFS image ({image_k(mode)}K, not counted); figures are the heap minus the image")
    return (f"board code and the simulator in place from one ROMFS image ({image_k(mode)}K, not counted); figures are "
            "the heap minus the image")


async def _requests(url: str, tok: dict, kind: str, n: int) -> list[str]:
    """n authenticated requests, 2 at a time (the device serves 3 connections at once, see DeviceWeb.max_connections,
    and a closing connection may still count for a moment); returns the problems (unexpected statuses)."""
    if kind == "relays":
        asks = [("GET", "/gpio", "viewer", None, 200), ("GET", "/gpio/relay1", "viewer", None, 200),
                ("POST", "/gpio/relay1", "operator", {"state": "toggle"}, 200),
                ("POST", "/gpio/relay2", "operator", {"state": "on", "pulse_ms": 200}, 200)]
    else:
        asks = [("GET", "/sensors", "viewer", None, 200)]
    asks += [("GET", "/info", "viewer", None, 200), ("GET", "/health", None, None, 200),
             ("GET", "/metrics", "viewer", None, 200), ("GET", "/info", None, None, 401),
             ("GET", "/gpio/nope" if kind == "relays" else "/nope", "viewer", None, 404)]
    problems: list[str] = []
    sem = asyncio.Semaphore(2)

    async def one(i: int) -> None:
        method, path, role, body, want = asks[i % len(asks)]
        headers = {"Authorization": f"Bearer {tok[role]}"} if role else {}
        async with sem:
            try:
                async with httpx.AsyncClient(timeout=10) as c:
                    r = await c.request(method, url + path, headers=headers, json=body)
                code = r.status_code
            except httpx.HTTPError as e:
                code = f"{type(e).__name__}"
        if code != want:
            problems.append(f"{method} {path}: {code} (wanted {want})")

    await asyncio.gather(*(one(i) for i in range(n)))
    return problems


async def _ws_client(url: str, tok: str, seconds: float) -> str | None:
    """One WebSocket client for `seconds`; a problem string or None. Frames must keep coming (no gap > 5 s)."""
    from websockets.asyncio.client import connect
    try:
        async with connect(f"{url}?token={tok}", open_timeout=15) as ws:
            end = time.monotonic() + seconds
            frames = 0
            while time.monotonic() < end:
                msg = await asyncio.wait_for(ws.recv(), timeout=5)
                if "seq" in json.loads(msg):
                    frames += 1
            return None if frames >= max(2, int(seconds) // 2) else f"websocket: only {frames} frames in {seconds}s"
    except Exception as e:  # noqa: BLE001 — any failure of a client is a failed run
        return f"websocket: {type(e).__name__}: {e}"


def _alarm_keys(cp_url: str, admin: str) -> set[str]:
    r = httpx.get(f"{cp_url}/api/v1/namespaces/{NS}/alarms", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    r.raise_for_status()
    return {a["key"] for a in r.json()["alarms"]}


def _wait(pred, timeout: float, what: str, dev: DeviceChild) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if dev.poll() is not None:
            raise Failed(f"device exited ({dev.poll()}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what}")
        time.sleep(0.2)


def _config_version(dev: DeviceChild, tok: str) -> int | None:
    try:
        r = httpx.get(dev.url + "/info", headers={"Authorization": f"Bearer {tok}"}, timeout=5)
        return r.json().get("config_version") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _metrics(dev: DeviceChild, tok: str) -> dict[str, float]:
    r = httpx.get(dev.url + "/metrics", headers={"Authorization": f"Bearer {tok}"}, timeout=30)
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line.startswith(("iotlib_heap_", "iotlib_memory_errors", "iotlib_tls_")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _ota_status(cp_url: str, admin: str, dev_id: str) -> dict:
    r = httpx.get(f"{cp_url}/api/v1/namespaces/{NS}/ota/status", params={"device": dev_id},
                  headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    r.raise_for_status()
    return r.json()["devices"][0]


def _ota_update(cp: ServerChild, admin: str, dev_id: str, dev: DeviceChild, tmp: Path, keyfile: Path) -> None:
    """An update of the complete board bundle, through the real control plane: it must install, reboot into trial
    (DeviceChild starts the process again after the simulated reset) and commit."""
    from picoiot import ota_cli
    release = tmp / "release"
    build.build_firmware(release, simulator=False)
    ota_cli.publish(cp.url, admin, NS, release, OTA_VERSION, keyfile)
    ota_cli.assign(cp.url, admin, NS, OTA_VERSION, dev_id, None)
    dev.restart_on_reset = True

    def done() -> bool:
        if dev.out_of_memory():  # wherever it happened: a reported failure or not, the update did not fit
            lines = [ln for ln in dev.log.read_text(errors="replace").splitlines() if "MemoryError" in ln]
            raise Failed(f"MemoryError during the update: {lines[-1][-200:] if lines else '?'}")
        st = _ota_status(cp.url, admin, dev_id)
        rep = st.get("report") or {}
        if rep.get("version") == OTA_VERSION and rep.get("status") not in (None, "installed"):
            raise Failed(f"ota {rep.get('status')}: {rep.get('reason')}")
        return rep.get("status") == "installed" and st.get("running") == OTA_VERSION

    _wait(done, 300, "the OTA update to install and commit", dev)
    note(f"ota committed after {dev.restarts} restart(s)")
    dev.wait_ready(60)


def scenario(kind: str, mode: str, heap_k: int, ws_seconds: float, requests: int = 200, ota: bool = False,
             report: dict | None = None, standard: bool = True, ota_wrong_key: bool = False) -> bool:
    """One full run at heap_k (plus the simulator's or the whole code's ROMFS image, which stands in for flash). True
    when it passed. ota: end with an OTA update of the whole board bundle. standard: False skips the standard
    scenario (boot to ready, then straight to the OTA update). ota_wrong_key: the device trusts another key than the
    release is signed with (it must refuse the update and report why). report: filled with the device's heap gauges
    (/metrics) at the end of a passing run, or {"failure": why} after a failed one."""
    with tempfile.TemporaryDirectory(prefix="devmem-") as tmp:
        tmp = Path(tmp)
        cp = ServerChild(tmp / "cp", extra=("--sweep-interval", "0.2", "--heartbeat-flush", "0.2"))
        dev = None
        try:
            cp.start()
            from picoiot.server.settings import Settings
            key_ = Settings.from_data_dir(cp.data_dir).secrets.signing_key
            admin = issue_token(key_, "bench-admin", NS, "admin", 3600)
            dev_id = f"{kind}-{mode}-{heap_k}-{next(_ids)}"
            overrides = dict(BASE_CONFIG, failsafe_after_s=2) if kind == "relays" else BASE_CONFIG
            key = provision_over_api(cp.url, admin, dev_id, kind, NS, overrides=overrides)
            settings = device_settings(tmp / "dev.json", key, kind, free_port(), tmp / "flash")
            if TLS_RESERVE:  # a CA in the settings, as a board on https has: the device holds its TLS block
                s = json.loads(settings.read_text())
                s["ca"] = _test_ca()
                settings.write_text(json.dumps(s))
            keyfile = tmp / "ota.key"
            if ota:
                from picoiot import ota_cli
                pub = ota_cli.keygen(keyfile)
                ota_cli.set_key(cp.url, admin, NS, pub)
                s = json.loads(settings.read_text())
                s["ota_public_key"] = ota_cli.keygen(tmp / "other.key") if ota_wrong_key else pub
                settings.write_text(json.dumps(s))
            heap = heap_k + image_k(mode)
            os.environ["PICOIOT_ROMFS"] = str(image(mode))  # what boot_romfs mounts
            entry, extra = "boot_romfs", None
            if TRACE:  # bench/mp_heap_stages.py prints the heap at each stage into the device log
                entry, extra = "mp_heap_stages", heaplib.BUILD
            dev = DeviceChild(settings, heap=f"{heap}K", bundle=BUNDLE, log=tmp / "dev.log", entry=entry,
                              extra_path=extra)
            dev.restart_on_reset = False
            dev.start()
            dev.wait_ready(60)                                   # registered, config applied, time synced
            tok = {r: device_local_token(key["device_key"], dev_id, r, 3600, sub=f"bench-{r}")
                   for r in ("viewer", "operator", "admin")}
            seen0 = httpx.get(f"{cp.url}/api/v1/namespaces/{NS}/devices/{dev_id}",
                              headers={"Authorization": f"Bearer {admin}"}, timeout=10).json().get("last_seen")

            async def traffic() -> list[str]:
                problems = await _requests(dev.url, tok, kind, requests)
                if kind == "sensors":  # the 3 clients hold every connection the device serves (max_connections)
                    ws = dev.url.replace("http://", "ws://") + "/ws"
                    out = await asyncio.gather(*[_ws_client(ws, tok["viewer"], ws_seconds) for _ in range(3)])
                    problems += [p for p in out if p]
                return problems

            problems = asyncio.run(traffic()) if standard else []
            if problems:
                raise Failed("; ".join(problems[:5]))
            note("requests done")
            # hot reload + alarm
            if not standard:
                pass
            elif kind == "sensors":
                v = httpx.patch(f"{cp.url}/api/v1/namespaces/{NS}/devices/{dev_id}/config",
                                headers={"Authorization": f"Bearer {admin}"}, timeout=10,
                                json={"overrides": dict(BASE_CONFIG, i2c={"bme280_address": 0x70})}).json()["version"]
                _wait(lambda: _config_version(dev, tok["viewer"]) == v, 30, f"config v{v}", dev)
                _wait(lambda: any(k.startswith("sensor.") for k in _alarm_keys(cp.url, admin)), 30, "sensor alarm",
                      dev)
            else:
                v = httpx.patch(f"{cp.url}/api/v1/namespaces/{NS}/devices/{dev_id}/config",
                                headers={"Authorization": f"Bearer {admin}"}, timeout=10,
                                json={"overrides": dict(BASE_CONFIG, failsafe_after_s=3)}).json()["version"]
                _wait(lambda: _config_version(dev, tok["viewer"]) == v, 30, f"config v{v}", dev)
                cp.stop()
                _wait(lambda: httpx.get(dev.url + "/info", timeout=5,
                                        headers={"Authorization": f"Bearer {tok['viewer']}"}).json()
                      .get("failsafe_active"), 30, "failsafe", dev)
                cp.start()
                _wait(lambda: "relays.failsafe" in _alarm_keys(cp.url, admin), 60, "failsafe alarm", dev)
            note("alarm delivered")
            if standard:
                _wait(lambda: httpx.get(f"{cp.url}/api/v1/namespaces/{NS}/devices/{dev_id}",
                                        headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()
                      .get("last_seen") not in (None, seen0), 30, "a heartbeat", dev)
            if ota:
                _ota_update(cp, admin, dev_id, dev, tmp, keyfile)
            if dev.poll() is not None:
                raise Failed(f"device exited ({dev.poll()})")
            if dev.out_of_memory():
                raise Failed("MemoryError in the device log")
            if report is not None:
                report.update(_metrics(dev, tok["viewer"]))
            return True
        except Exception as e:  # noqa: BLE001 — any failure (timeouts, refused connections, …) fails the run
            oom = dev is not None and dev.out_of_memory()
            if report is not None:
                report["failure"] = f"{'MemoryError; ' if oom else ''}{e}"
            note(f"{kind}/{mode} @ {heap_k}K failed: {'MemoryError; ' if oom else ''}{e}")
            if VERBOSE and oom:
                log = (tmp / "dev.log").read_text(errors="replace").splitlines()
                hits = [i for i, ln in enumerate(log) if "MemoryError" in ln]
                for ln in log[max(0, hits[0] - 12):hits[0] + 2]:
                    note("  | " + ln[:200])
            return False
        finally:
            if dev is not None:
                dev.stop()
            cp.stop()
            if TRACE and (tmp / "dev.log").exists():
                _print_trace((tmp / "dev.log").read_text(errors="replace"))
                if os.getenv("PICOIOT_TRACE_LOG"):  # keep the whole device log (with PICOIOT_QSTRS: every name)
                    Path(os.environ["PICOIOT_TRACE_LOG"]).write_text((tmp / "dev.log").read_text(errors="replace"))


def _print_trace(text: str) -> None:
    """The STAGE lines of bench/mp_heap_stages.py, each with its qstr pool figures, and the steady-state maximum."""
    lines = text.splitlines()
    steady = []
    for i, ln in enumerate(lines):
        if ln.startswith("STAGE "):
            _, tag, alloc, free = ln.split()
            q = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("qstr pool") else ""
            print(f"  {tag:8} heap {int(alloc):7,}  free {int(free):7,}  {q}", flush=True)
            if tag.startswith("t"):
                steady.append(int(alloc))
    if steady:
        print(f"  steady state: min {min(steady):,}  max {max(steady):,}  last {steady[-1]:,}", flush=True)


def code_loads(kind: str, heap_k: int) -> bool:
    """The controller's code merely loaded from .mpy (main_sim.preload: every module it imports), nothing constructed
    or run, the simulator in place from its image: the floor under any scenario figure in mpy mode."""
    script = (f"import gc\nimport boot_romfs\nboot_romfs.mount('{image('mpy')}')\n"
              "import picosim as sim\nsim.configure(flash_root='/tmp/picoiot-devmem-floor')\n"
              f"import main_sim\nmain_sim.preload('{kind}')\ngc.collect()\nprint('LOADED')\n")
    heap = heap_k + image_k("mpy")
    proc = subprocess.run([paths.micropython_bin(), "-X", f"heapsize={heap}K", "-c", script], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, MICROPYPATH=f"{BUNDLE}:.frozen"))
    return proc.returncode == 0 and "LOADED" in proc.stdout and "MemoryError" not in proc.stdout + proc.stderr


def breakdown(kind: str) -> list[tuple[str, int, int, int]]:
    """(module, heap bytes it costs loaded from .mpy, of which interned-name pool bytes, new names) for every module
    the controller loads, in its load order (bench/mp_device_modules.py; the simulator outside the heap)."""
    import re
    proc = subprocess.run([paths.micropython_bin(), "-X", "heapsize=1M", "-m", "mp_device_modules", str(image("mpy")),
                           kind], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MICROPYPATH=f"{BUNDLE}:{heaplib.BUILD}:.frozen"))
    if proc.returncode != 0:
        raise RuntimeError("mp_device_modules failed:\n" + proc.stdout[-600:] + proc.stderr[-600:])
    snaps: list[list] = []
    for line in proc.stdout.splitlines():
        if line.startswith("MOD "):
            _, tag, alloc = line.split()
            snaps.append([tag, int(alloc)])
        else:
            m = re.search(r"n_qstr=(\d+), n_str_data_bytes=\d+, n_total_bytes=(\d+)", line)
            if m and snaps and len(snaps[-1]) == 2:
                snaps[-1] += [int(m.group(1)), int(m.group(2))]
    return [(b[0], b[1] - a[1], b[3] - a[3], b[2] - a[2]) for a, b in zip(snaps, snaps[1:])]


def print_breakdown(kind: str) -> None:
    rows = breakdown(kind)
    print(f"\n{kind}: heap each module costs loaded from .mpy (bytes, load order; qstr pool = interned names, it grows "
          "by doubling so its cost lands on the module that needs the next pool):")
    print(f"  {'module':<22}{'heap':>8}{'code+objs':>11}{'qstr pool':>11}{'new qstrs':>11}")
    for name, heap, qbytes, nq in rows:
        print(f"  {name:<22}{heap:>8}{heap - qbytes:>11}{qbytes:>11}{nq:>11}")
    t = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"  {'total':<22}{t[0]:>8}{t[0] - t[1]:>11}{t[1]:>11}{t[2]:>11}", flush=True)


def _test_ca() -> str:
    """A CA certificate as base64 DER (what provisioning writes into a board's settings)."""
    import base64
    import ssl

    import trustme
    return base64.b64encode(ssl.PEM_cert_to_DER_cert(trustme.CA().cert_pem.bytes().decode())).decode()


def hello_ok(heap_k: int) -> bool:
    return heaplib.served_ok("mp_hello", heap_k, requests=200)


def _block(report: dict) -> str:
    """The heap gauges a run left, as one phrase: the largest free block now (after a collection) and its lowest since
    boot, and the lowest free heap after a collection since boot (both sampled at each /metrics and once a minute)."""
    if not report:
        return "heap gauges: none"
    k = lambda name: f"{report[name] / 1024:.1f}K" if name in report else "?"  # noqa: E731
    largest = report.get("iotlib_heap_largest_free_block_bytes", 0)
    held = report.get("iotlib_tls_reserve_bytes", 0)
    verdict = "ok" if max(largest, held) >= TLS_MIN else f"UNDER {TLS_MIN // 1024}K"
    return (f"TLS reserve held {k('iotlib_tls_reserve_bytes')}, largest free block "
            f"{k('iotlib_heap_largest_free_block_bytes')} ({verdict} for TLS), lowest since boot "
            f"{k('iotlib_heap_largest_free_block_min_bytes')}; lowest free heap since boot "
            f"{k('iotlib_heap_free_min_bytes')}")


def _budget(kind: str, mode: str, m: int | None) -> str:
    b = BUDGET_K[kind][0 if mode == "mpy" else 1]
    if not m or "32-bit" not in paths.micropython_info():  # the budgets are a Pico W's: 32-bit figures
        return f"budget {b}K (32-bit)"
    return f"budget {b}K (32-bit): {'within' if m <= b else 'over'}" + ("; moonshot 128K: " + (
        "within" if m <= 128 else "over") if mode == "mpy" else "")


def main(argv: list[str] | None = None) -> int:
    global VERBOSE, BUNDLE, TRACE, TLS_RESERVE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("relays", "sensors", "both"), default="both")
    ap.add_argument("--mode", choices=("mpy", "romfs", "both"), default="both")
    ap.add_argument("--ws-seconds", type=float, default=30.0, help="how long the 3 WebSocket clients run (sensors)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--once", type=int, metavar="HEAP_K", help="one run per kind/mode at this heap, no bisection")
    ap.add_argument("--lo", type=int, default=64)
    ap.add_argument("--hi", type=int, default=384)
    ap.add_argument("--step", type=int, default=1, help="bisection resolution in KiB (8: faster, coarser)")
    ap.add_argument("--no-hello", action="store_true", help="skip microdot's hello world")
    ap.add_argument("--no-floor", action="store_true", help="skip the code-alone floor (mpy)")
    ap.add_argument("--no-block", action="store_true", help="skip the run at 192K that reports the largest free block")
    ap.add_argument("--ota", action="store_true", help="end every run with an OTA update of the whole board bundle")
    ap.add_argument("--no-standard", action="store_true",
                    help="skip the standard scenario: boot to ready, then (with --ota) straight to the update")
    ap.add_argument("--breakdown", action="store_true", help="only print the heap each module costs loaded (.mpy)")
    ap.add_argument("--micropython", metavar="PATH", help="the unix micropython to measure (default: "
                    "$PICOIOT_MICROPYTHON, else the pinned 64-bit one)")
    ap.add_argument("--bundle", type=Path, default=BUNDLE, help="build directory (runs at once need their own)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--tls-reserve", action="store_true",
                    help="give the device a CA, as a board on https has: it holds its TLS block (HTTPClient.tls_reserve) "
                         "from boot; the control plane stays plain http, so no session runs")
    ap.add_argument("--trace", action="store_true",
                    help="run the device under bench/mp_heap_stages.py and print its heap at each stage (use --once)")
    a = ap.parse_args(argv)
    VERBOSE, BUNDLE, TRACE, TLS_RESERVE = a.verbose, a.bundle, a.trace, a.tls_reserve
    paths.use_micropython(a.micropython)
    build.build_romfs(BUNDLE)
    build.build_sim_romfs(BUNDLE)
    heaplib.bundle()
    heaplib.compile_script(Path(__file__).resolve().parent / "mp_hello.py")
    heaplib.compile_script(Path(__file__).resolve().parent / "mp_device_modules.py")
    if TRACE:
        heaplib.compile_script(Path(__file__).resolve().parent / "mp_heap_stages.py")
    kinds = ("relays", "sensors") if a.kind == "both" else (a.kind,)
    if a.breakdown:
        print(f"interpreter: {paths.micropython_info()}", flush=True)
        for kind in kinds:
            print_breakdown(kind)
        return 0
    modes = ("mpy", "romfs") if a.mode == "both" else (a.mode,)
    print(f"interpreter: {paths.micropython_info()}", flush=True)
    for mode in modes:
        print(f"counted ({mode}): {counted(mode)}", flush=True)
    what = "boot to ready" if a.no_standard else f"standard: {a.requests} requests, ws {a.ws_seconds:g}s (sensors)"
    print(f"scenario: {what}{', then an OTA update of the whole board bundle' if a.ota else ''}", flush=True)
    if a.once:
        ok = True
        for kind, mode in itertools.product(kinds, modes):
            rep: dict = {}
            r = scenario(kind, mode, a.once, a.ws_seconds, a.requests, a.ota, rep, not a.no_standard)
            print(f"{kind:8} {mode:6} {a.once}K: {'OK' if r else 'FAIL'}  " + (_block(rep) if r else rep["failure"]),
                  flush=True)
            ok &= r
        return 0 if ok else 1
    hello = None if a.no_hello else heaplib.min_heap(hello_ok, lo=16, hi=256)
    if hello is not None:
        print(f"microdot hello world: {hello}K", flush=True)
    if "mpy" in modes and not a.no_floor:
        for kind in kinds:
            floor = heaplib.min_heap(lambda h: code_loads(kind, h), lo=32, hi=512)
            print(f"{kind:8} mpy    code alone (loaded, nothing run): "
                  f"{f'{floor}K' if floor else 'fails even at 512K'}", flush=True)
    for kind, mode in itertools.product(kinds, modes):
        st = a.step
        m = heaplib.min_heap(lambda h: scenario(kind, mode, h * st, a.ws_seconds, a.requests, a.ota,
                                                standard=not a.no_standard), lo=a.lo // st, hi=a.hi // st)
        m = m * st if m else m
        ratio = f"  ratio to hello world {m / hello:.2f}" if m and hello else ""
        print(f"{kind:8} {mode:6} min heap {m}K  {_budget(kind, mode, m)}{ratio}" if m else
              f"{kind:8} {mode:6} fails even at {a.hi}K", flush=True)
        if not a.no_block:
            rep = {}
            ok = scenario(kind, mode, 192, a.ws_seconds, a.requests, a.ota, rep, not a.no_standard)
            print(f"{kind:8} {mode:6} at 192K: " + (_block(rep) if ok else "failed: " + rep["failure"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
