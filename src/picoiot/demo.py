"""`picoiot demo`: the whole platform on one machine, with one command.

Starts the control plane (SQLite in the data directory, SNTP on an unprivileged UDP port), provisions one relays and
one sensors device, runs both on the simulated Pico W under the unix micropython with a Pico-sized heap, waits until
both say ready, then prints (and writes to DIR/demo.json and DIR/demo.env) their URLs, ready-to-use tokens and example
commands. Ctrl-C or SIGTERM stops every process it started; a device that resets (exit status 75) is started again.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .procs import (DEFAULT_HEAP, RUNTIMES, DeviceChild, DeviceWatch, ProcError, ServerChild, device_settings,
                    ensure_bundle, free_port, heap_bytes, micropython_available, provision_over_api, write_json)

NAMESPACE = "default"
DEVICES = (("demo-relays", "relays"), ("demo-sensors", "sensors"))


class _Stop(Exception):
    pass


def _on_signal(signum, frame):  # noqa: ARG001
    raise _Stop(signal.Signals(signum).name)


class Demo:
    def __init__(self, data_dir: Path, port: int, heap: Optional[str], runtime: str, token_ttl: int, say):
        self.dir = data_dir.resolve()
        self.port = port
        self.heap = heap
        self.runtime = runtime
        self.token_ttl = token_ttl
        self.say = say
        self.server: Optional[ServerChild] = None
        self.devices: list[DeviceChild] = []
        self.keys: dict[str, dict] = {}

    # --- start ---------------------------------------------------------------------------------------------------
    def start_server(self) -> None:
        port = free_port(preferred=self.port) if self.port else free_port()
        if self.port and port != self.port:
            self.say(f"[yellow]port {self.port} is taken: the control plane uses {port}[/]")
        self.server = ServerChild(self.dir / "control-plane", port=port,
                                  # SNTP next to it when the port range allows (free_port: 65500 + 123 is any)
                                  sntp_port=free_port(socket.SOCK_DGRAM, preferred=port + 123),
                                  log=self.dir / "logs" / "control-plane.log")
        self.server.start()
        from .server.settings import Settings
        self.secrets = Settings.from_data_dir(self.server.data_dir).secrets
        self.say(f"control plane  {self.server.url}  (SQLite in {self.server.data_dir}, SNTP on UDP "
                 f"{self.server.sntp_port})")

    def admin_token(self, ttl: int = 300) -> str:
        from .server.auth import issue_token
        return issue_token(self.secrets.signing_key, "demo", NAMESPACE, "admin", ttl)

    def provision(self) -> None:
        from .server.auth import derive_device_key
        for dev_id, kind in DEVICES:
            key = provision_over_api(self.server.url, self.admin_token(), dev_id, kind, NAMESPACE)
            if key is None:  # enrolled by an earlier run: keys are derived from the namespace's enrollment key
                key = {"device_id": dev_id, "namespace": NAMESPACE,
                       "device_key": derive_device_key(self.secrets.enrollment_key(NAMESPACE), dev_id),
                       "service_discovery_url": f"{self.server.url}/api/devices"}
            # the key file of an earlier run may name an earlier port: always point at this server
            key["service_discovery_url"] = f"{self.server.url}/api/devices"
            self.keys[dev_id] = key

    def start_devices(self) -> None:
        runtime = self.runtime
        if runtime == "micropython":
            if not micropython_available():
                self.say("[yellow]micropython / mpy-cross not found (./dev setup installs them): running the "
                         "devices on CPython[/]")
                runtime = "cpython"
            else:
                self.bundle = ensure_bundle(self.dir / "firmware")
        used = set()
        for i, (dev_id, kind) in enumerate(DEVICES):
            port = free_port(preferred=self.server.port + 1 + i)
            while port in used:
                port = free_port()
            used.add(port)
            settings = device_settings(self.dir / "devices" / f"{dev_id}.json", self.keys[dev_id], kind, port,
                                       self.dir / "devices" / f"{dev_id}.flash")
            self.devices.append(self._device(settings, runtime, self.heap or DEFAULT_HEAP[kind]).start())
        for dev in self.devices:
            try:
                # a heap that is too small can also leave the device up but failing: give up on the first
                # MemoryError instead of waiting for a readiness that will not come
                dev.wait_ready(90, stop=dev.out_of_memory)
            except ProcError as e:
                hint = (f" (MemoryError: a {dev.kind} device needs more than a {dev.heap} heap; the default is the "
                        f"measured need, docs/benchmarks.md)" if dev.out_of_memory() else "")
                raise ProcError(f"{dev.name} cannot start: {e}{hint}") from None

    def _device(self, settings: Path, runtime: str, heap: str) -> DeviceChild:
        log = self.dir / "logs" / (settings.stem + ".log")
        return DeviceChild(settings, runtime=runtime, heap=heap if runtime == "micropython" else "-",
                           bundle=getattr(self, "bundle", None), log=log)

    # --- what the user gets --------------------------------------------------------------------------------------
    def tokens(self) -> dict:
        from .server.auth import device_local_token, issue_token
        ttl = self.token_ttl
        cp = {r: issue_token(self.secrets.signing_key, f"demo-{r}", NAMESPACE, r, ttl)
              for r in ("viewer", "operator", "admin")}
        devs = {d.device_id: {r: device_local_token(self.keys[d.device_id]["device_key"], d.device_id, r, ttl,
                                                     sub=f"demo-{r}") for r in ("viewer", "operator", "admin")}
                for d in self.devices}
        return {"control_plane": cp, "devices": devs, "expires_in_s": ttl}

    def dashboard(self) -> dict:
        """The dashboard's URL and a one-time sign-in link (admin; valid 1 h; the CP_* tokens can be pasted too)."""
        from .server.ui.session import issue_ticket
        ticket = issue_ticket(self.secrets.signing_key, "demo-admin", NAMESPACE, "admin", 3600)
        return {"url": f"{self.server.url}/ui/", "login_link": f"{self.server.url}/ui/login?ticket={ticket}"}

    def describe(self) -> dict:
        return {"control_plane_url": self.server.url, "dashboard": self.dashboard(), "namespace": NAMESPACE,
                "sntp_port": self.server.sntp_port,
                "devices": [{"id": d.device_id, "kind": d.kind, "url": d.url, "runtime": d.runtime,
                             "heap": d.heap if d.runtime == "micropython" else None, "pid": d.pid,
                             "log": str(d.log)} for d in self.devices],
                "tokens": self.tokens(), "data_dir": str(self.dir), "pid": os.getpid()}

    def examples(self, info: dict) -> list[tuple[str, str]]:
        cp = info["control_plane_url"]
        relays = next(d for d in info["devices"] if d["kind"] == "relays")
        sensors = next(d for d in info["devices"] if d["kind"] == "sensors")
        ws = sensors["url"].replace("http://", "ws://")
        return [
            ("list the relays", f'curl -s -H "Authorization: Bearer $RELAYS_VIEWER" {relays["url"]}/gpio'),
            ("switch relay1 on over REST",
             f'curl -s -X POST -H "Authorization: Bearer $RELAYS_OPERATOR" -H "Content-Type: application/json" '
             f'-d \'{{"state": "on"}}\' {relays["url"]}/gpio/relay1'),
            ("switch relay1 off through the control plane (desired state: pushed over the device's held long-poll, "
             "at the pin in tens of ms; the device applies and reports it)",
             f'curl -s -X POST -H "Authorization: Bearer $CP_OPERATOR" -H "Content-Type: application/json" '
             f'-d \'{{"state": {{"desired": {{"relay1": "off"}}}}}}\' '
             f'{cp}/api/v1/namespaces/{NAMESPACE}/devices/{relays["id"]}/shadows/default'),
            ("read the sensors", f'curl -s -H "Authorization: Bearer $SENSORS_VIEWER" {sensors["url"]}/sensors'),
            ("stream sensor frames over the WebSocket", f'python -m websockets "{ws}/ws?token=$SENSORS_VIEWER"'),
            ("devices as the control plane sees them",
             f'curl -s -H "Authorization: Bearer $CP_VIEWER" {cp}/api/v1/namespaces/{NAMESPACE}/devices'),
            ("reboot the relays device (admin; it comes back with its restore states)",
             f'curl -s -X POST -H "Authorization: Bearer $RELAYS_ADMIN" {relays["url"]}/reboot'),
        ]

    def env_lines(self, info: dict) -> list[str]:
        t = info["tokens"]
        # a new shell that sources this finds the venv's python (websockets, picoiot), the control plane, a token
        # for the CLI's remote commands and the data dir `picoiot token` mints from
        venv_bin = shlex.quote(str(Path(sys.executable).parent))
        out = [f'export PATH={venv_bin}:"$PATH"',
               f"export PICOIOT_URL={info['control_plane_url']}",
               f"export PICOIOT_TOKEN={t['control_plane']['admin']}",
               f"export PICOIOT_DATA_DIR={shlex.quote(str(self.server.data_dir.resolve()))}"]
        out += [f"export CP_{r.upper()}={v}" for r, v in t["control_plane"].items()]
        for d in info["devices"]:
            prefix = d["kind"].upper()
            out += [f"export {prefix}_{r.upper()}={v}" for r, v in t["devices"][d["id"]].items()]
        return out

    def write_files(self, info: dict) -> None:
        write_json(self.dir / "demo.json", info, 0o600)  # tokens inside: owner only
        env = self.dir / "demo.env"
        tmp = env.with_name(".demo.env.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(self.env_lines(info)) + "\n")
        os.replace(tmp, env)

    # --- run / stop ----------------------------------------------------------------------------------------------
    def watch(self, duration: Optional[float]) -> int:
        """Supervise until the duration is over or a signal arrives; 0 on a clean stop, 1 if the control plane died."""
        end = None if duration is None else time.monotonic() + duration
        watch = DeviceWatch(self.devices, self.say)
        while end is None or time.monotonic() < end:
            if self.server.poll() is not None:
                self.say(f"[red]the control plane exited ({self.server.exit_status}); stopping[/]\n"
                         + self.server.tail(1500))
                return 1
            watch.check()
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        for d in self.devices:
            d.stop()
        if self.server is not None:
            self.server.stop()


def _print(console, demo: Demo, info: dict) -> None:
    from rich.table import Table
    t = Table(title="simulated devices", title_justify="left")
    for col in ("device", "kind", "URL", "runs on"):
        t.add_column(col)
    for d in info["devices"]:
        t.add_row(d["id"], d["kind"], d["url"], f"micropython, {d['heap']} heap" if d["runtime"] == "micropython"
                  else "CPython")
    console.print(t)
    console.print(f"\n[bold]tokens[/] (valid {demo.token_ttl // 3600} h) for this shell:  "
                  f"[cyan]source {demo.dir / 'demo.env'}[/]")
    for line in demo.env_lines(info)[1:]:  # (not PATH: demo.env puts the venv first)
        name, _, value = line.removeprefix("export ").partition("=")
        console.print(f"  {name:<18} {value}", soft_wrap=True, highlight=False)
    console.print("\n[bold]try[/]")
    for what, cmd in demo.examples(info):
        console.print(f"  [dim]# {what}[/]")
        console.print(f"  {cmd}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"\n[bold]dashboard[/]  {info['dashboard']['url']}")
    console.print(f"  one-time sign-in link (admin, 1 h): {info['dashboard']['login_link']}", soft_wrap=True,
                  highlight=False, markup=False)
    console.print("  or paste one of the CP_* tokens above into its sign-in form")
    console.print("\n[bold]cloud vs device[/]  a desired state reaches the relay in tens of ms (the device holds a "
                  "long-poll; docs/benchmarks.md). When they disagree the device wins: a local POST /gpio, a pulse's "
                  "end, max_on_s, interlock and failsafe override a desired value already applied, and the device "
                  "clears it from the shadow, so the cloud never switches the relay back; a desired value written "
                  "later is applied. Each switch's cause is in the device log, GET /gpio/<relay> and the shadow's "
                  "reported.cause.", soft_wrap=True, highlight=False)
    console.print(f"\nall of this is in {demo.dir / 'demo.json'};  logs in {demo.dir / 'logs'}")


def demo(data_dir: Path = typer.Option(Path(".picoiot-demo"), "--data-dir", help="control-plane data, device "
                                       "flash, logs, demo.json"),
         port: int = typer.Option(8080, min=0, max=65535,
                                  help="control-plane port (devices take the next free ones; 0 = any)"),
         heap: Optional[str] = typer.Option(None, help="MicroPython heap per device (-X heapsize) [default: each "
                                            "kind's measured need: relays 320K, sensors 384K]"),
         runtime: str = typer.Option("micropython", help="micropython | cpython"),
         duration: Optional[float] = typer.Option(None, help="stop after this many seconds of running (tests)"),
         token_ttl: int = typer.Option(86400, help="lifetime of the printed tokens, seconds")) -> None:
    """Control plane + one simulated relays and one sensors device, ready to use; Ctrl-C stops everything."""
    from rich.console import Console
    console = Console()
    if runtime not in RUNTIMES:
        console.print(f"[red]error:[/] --runtime must be one of {', '.join(RUNTIMES)}")
        raise typer.Exit(2)
    try:
        if heap is not None:
            heap_bytes(heap)
    except ValueError:
        console.print(f"[red]error:[/] --heap {heap!r}: expected a size like 192K")
        raise typer.Exit(2)
    data_dir.mkdir(parents=True, exist_ok=True)
    d = Demo(data_dir, port, heap, runtime, token_ttl, console.print)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        with console.status("starting the control plane…"):
            d.start_server()
        d.provision()
        with console.status("building the firmware and starting the simulated devices…"):
            d.start_devices()
        info = d.describe()
        d.write_files(info)
        _print(console, d, info)
        console.print("\n[green]demo running[/]" + (f" for {duration:g} s" if duration else " — Ctrl-C stops it"))
        status = d.watch(duration)
    except _Stop as e:
        console.print(f"\n{e}: stopping")
    except ProcError as e:
        console.print(f"[red]error:[/] {e}")
        status = 1
    finally:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            d.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    console.print("stopped: control plane and devices")
    raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
