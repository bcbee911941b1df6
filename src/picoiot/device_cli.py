"""`picoiot sim`: N simulated devices of one kind against a running control plane.

Each device is enrolled through the operators' API (admin token from --token / $PICOIOT_TOKEN, or minted from the
server's --data-dir), gets its own settings file and flash directory under --state-dir, and runs as its own process
(unix micropython with a Pico-sized heap, or CPython). A simulated reset (exit status 75) restarts the process with
the same flash, as a board boots again; a device that was enrolled by an earlier run keeps its key file.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from .procs import (DEFAULT_HEAP, RUNTIMES, DeviceChild, DeviceWatch, ProcError, device_settings, ensure_bundle,
                    free_port, heap_bytes, micropython_available, provision_over_api)


class _Stop(Exception):
    pass


def _on_signal(signum, frame):  # noqa: ARG001
    raise _Stop(signal.Signals(signum).name)


def _admin_token(token: Optional[str], data_dir: Optional[Path], namespace: str) -> str:
    if token:
        return token
    if data_dir is None:
        raise ProcError("provisioning needs an admin token: --token / $PICOIOT_TOKEN, or the server's --data-dir")
    from .server.auth import issue_token
    from .server.settings import SECRETS_FILE, Settings
    if not (data_dir / SECRETS_FILE).exists():  # never create a fresh (useless) secret store by accident
        raise ProcError(f"{data_dir} holds no control-plane secrets (is it the server's --data-dir?)")
    return issue_token(Settings.from_data_dir(data_dir).secrets.signing_key, "picoiot-sim", namespace, "admin", 600)


def _key_for(state_dir: Path, url: str, token: str, dev_id: str, kind: str, namespace: str,
             data_dir: Optional[Path]) -> dict:
    """The device's key file: from an earlier run, else enrolled now; a device the server already knows but whose key
    file is gone gets its derived key from the server's data dir."""
    key_file = state_dir / f"{dev_id}.key.json"
    if key_file.exists():
        return json.loads(key_file.read_text())
    key = provision_over_api(url, token, dev_id, kind, namespace)
    if key is None:
        if data_dir is None:
            raise ProcError(f"{dev_id} is already enrolled and {key_file} is gone: delete the device on the server, "
                            "or pass the server's --data-dir")
        from .server.auth import derive_device_key
        from .server.settings import Settings
        enrollment = Settings.from_data_dir(data_dir).secrets.enrollment_key(namespace)
        key = {"device_id": dev_id, "namespace": namespace, "device_key": derive_device_key(enrollment, dev_id),
               "service_discovery_url": f"{url}/api/devices"}
    from .procs import write_json
    write_json(key_file, key, 0o600)
    return key


def sim(kind: Optional[str] = typer.Option(None, "--kind", help="relays | sensors"),
        settings: Optional[Path] = typer.Option(None, "--settings", help="run one device from a board settings file "
                                                "(picoiot provision --board-settings) through the board's main.py"),
        count: int = typer.Option(1, "--count", min=1, max=64, help="how many devices"),
        server: str = typer.Option("http://127.0.0.1:8080", "--url", "--server", envvar="PICOIOT_URL",
                                   help="control-plane URL (--server: the old spelling)"),
        runtime: str = typer.Option("micropython", help="micropython | cpython"),
        heap: Optional[str] = typer.Option(None, help="MicroPython heap per device (-X heapsize) [default: the "
                                                       "kind's measured need: relays 320K, sensors 384K]"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="PICOIOT_DATA_DIR",
                                                help="the server's data dir (to mint an admin token)"),
        token: Optional[str] = typer.Option(None, "--token", envvar="PICOIOT_TOKEN", help="admin token"),
        namespace: str = typer.Option("default", "--namespace", "-n"),
        prefix: Optional[str] = typer.Option(None, help="device ids are <prefix>-<n> [default: sim-<kind>]"),
        base_port: int = typer.Option(9100, help="first device's port (the next free ones follow)"),
        state_dir: Path = typer.Option(Path(".picoiot-sim"), help="key files, settings, flash and logs"),
        duration: Optional[float] = typer.Option(None, help="stop after this many seconds of running"),
        ready_timeout: float = typer.Option(90, help="seconds each device gets to become ready")) -> None:
    """Run simulated devices against a control plane until Ctrl-C (resets restart them with the same flash)."""
    from rich.console import Console
    console = Console()

    def fail(msg: str) -> None:
        console.print(f"[red]error:[/] {msg}")
        raise typer.Exit(2)

    if settings is not None:
        from .deploy import DeployError, read_settings
        try:
            board = read_settings(settings)
        except DeployError as e:
            fail(str(e))
        kind = board["kind"]
    if kind not in ("relays", "sensors"):
        fail("--kind must be relays or sensors")
    if runtime not in RUNTIMES:
        fail(f"--runtime must be one of {', '.join(RUNTIMES)}")
    heap = heap or DEFAULT_HEAP[kind]
    try:
        heap_bytes(heap)
    except ValueError:
        fail(f"--heap {heap!r}: expected a size like 192K")
    if runtime == "micropython" and not micropython_available():
        fail("micropython / mpy-cross not found (./dev setup), or use --runtime cpython")
    url = server.rstrip("/")
    prefix = prefix or f"sim-{kind}"
    state_dir = state_dir.resolve()
    devices: list[DeviceChild] = []
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        bundle = ensure_bundle(state_dir / "firmware") if runtime == "micropython" else None
        if settings is not None:
            devices.append(_board_device(board, state_dir, runtime, heap, bundle, base_port))
            count = 1
        else:
            import httpx
            try:
                httpx.get(url + "/health", timeout=5).raise_for_status()
            except httpx.HTTPError as e:
                raise ProcError(f"no control plane at {url}: {type(e).__name__}") from None
            tok = _admin_token(token, data_dir, namespace)
        port = base_port
        for i in range(1, count + 1 if settings is None else 1):
            dev_id = f"{prefix}-{i}"
            key = _key_for(state_dir, url, tok, dev_id, kind, namespace, data_dir)
            key["service_discovery_url"] = f"{url}/api/devices"
            port = free_port(preferred=port)
            settings = device_settings(state_dir / f"{dev_id}.json", key, kind, port, state_dir / f"{dev_id}.flash")
            devices.append(DeviceChild(settings, runtime=runtime, heap=heap, bundle=bundle,
                                       log=state_dir / "logs" / f"{dev_id}.log").start())
            port += 1
        with console.status(f"waiting for {count} {kind} device(s) to become ready…"):
            for d in devices:
                try:
                    d.wait_ready(ready_timeout, stop=d.out_of_memory)
                    console.print(f"{d.device_id}  {d.url}  ready")
                except ProcError as e:
                    hint = (f" — MemoryError: a {kind} device needs more than {heap} (docs/benchmarks.md, Device "
                            f"memory)" if d.out_of_memory() else "")
                    console.print(f"[red]{e}[/]{hint}")
                    d.stop()
                    status = 1
        if not any(d.running() for d in devices):
            raise ProcError("no device started")
        console.print(f"[green]{sum(d.running() for d in devices)} device(s) running[/]" +
                      (f" for {duration:g} s" if duration else " — Ctrl-C stops them") +
                      f"; logs in {state_dir / 'logs'}")
        end = None if duration is None else time.monotonic() + duration
        watch = DeviceWatch(devices, console.print, gone={d.device_id for d in devices if not d.running()})
        while end is None or time.monotonic() < end:
            watch.check()
            time.sleep(0.2)
    except _Stop as e:
        console.print(f"\n{e}: stopping")
    except ProcError as e:
        console.print(f"[red]error:[/] {e}")
        status = 1
    finally:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for d in devices:
                d.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    console.print(f"stopped {len(devices)} device(s)")
    raise typer.Exit(status)


def _board_device(board: dict, state_dir: Path, runtime: str, heap: str, bundle: Optional[Path],
                  base_port: int) -> DeviceChild:
    """The board's main.py on a simulated board whose flash directory holds a copy of the settings file, with the
    local API moved to 127.0.0.1 and a free port (what a board would serve on its WLAN address, port 80)."""
    from . import paths
    from .deploy import SETTINGS_NAME, write_private
    dev_id = board["device_id"]
    flash = state_dir / f"{dev_id}.flash"
    doc = dict(board, host="127.0.0.1", port=free_port(preferred=base_port))
    doc["sim"] = dict(board.get("sim") or {}, flash_dir=str(flash))
    write_private(flash / SETTINGS_NAME, doc)
    return DeviceChild(flash / SETTINGS_NAME, runtime=runtime, heap=heap, bundle=bundle,
                       log=state_dir / "logs" / f"{dev_id}.log", entry="main", extra_path=paths.FIRMWARE).start()


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)
