"""From a new Pico W to a running device: the board settings file, `picoiot deploy` and `picoiot firmware freeze`.

The settings file is what `firmware/iotlib/settings.py` reads on the board (docs/hardware.md, "The settings file";
schema: docs/board-settings.schema.json). `deploy` stages the bundle (`.mpy` files, or a ROMFS image) and puts it on
the board with mpremote, one mpremote command per step, so `--dry-run` prints exactly what would run. `freeze` writes a
MicroPython manifest.py for users who build their own firmware.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from . import build, bundles, paths

KINDS = ("relays", "sensors")
SETTINGS_NAME = "settings.json"
#: what never goes onto a board: the simulation launchers (main.py is the board's entry point)
_HOST_ONLY = ("main_sim", "boot_romfs")


class DeployError(RuntimeError):
    """One line saying what went wrong and what to do."""


# ------------------------------------------------------------------------------------------------ settings file
def ca_to_der_b64(pem_file: Path) -> str:
    """The first certificate of a PEM file as base64 DER (the device's TLS takes DER; no PEM parsing on the board)."""
    try:
        text = pem_file.read_text()
    except OSError as e:
        raise DeployError(f"--ca {pem_file}: {e.strerror or e}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise DeployError(f"--ca {pem_file}: no PEM certificate in it")
    start = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    der = ssl.PEM_cert_to_DER_cert(text[start:end])
    return base64.b64encode(der).decode()


def board_settings(key: dict, kind: str, wifi: list[tuple[str, str]], ca_file: Optional[Path] = None,
                   ota_key: Optional[str] = None, relay_pins: Optional[dict] = None,
                   api_tokens: Optional[list[dict]] = None, ntp_servers: Optional[list[str]] = None) -> dict:
    """A complete settings file from a provisioning key file {device_id, device_key, namespace,
    service_discovery_url}. Raises DeployError naming the option at fault."""
    if kind not in KINDS:
        raise DeployError("--kind must be relays or sensors")
    url = key["service_discovery_url"]
    if url.startswith("https://") and ca_file is None:
        raise DeployError("the discovery URL is https: give --ca (the PEM of the CA that signed the server's "
                          "certificate), the device verifies the server with it")
    if ota_key is not None:
        if len(ota_key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in ota_key):
            raise DeployError("--ota-key must be the Ed25519 public key as 64 hex digits (picoiot ota keygen)")
    doc: dict = {"version": 1, "kind": kind, "device_id": key["device_id"], "device_key": key["device_key"],
                 "namespace": key.get("namespace", "default"), "service_discovery_url": url,
                 "wifi": [{"ssid": s, "password": p} for s, p in wifi]}
    if ca_file is not None:
        doc["ca"] = ca_to_der_b64(ca_file)
    if ota_key:
        doc["ota_public_key"] = ota_key.lower()
    if relay_pins and kind == "relays":
        doc["controller"] = {"relay_pins": relay_pins}
    if ca_file is not None:
        # a board's TLS checks certificate dates against its RTC (2021 at power-on): SNTP must come before HTTPS
        doc.setdefault("controller", {})["config"] = {"time": {"servers": list(ntp_servers or ["pool.ntp.org"])}}
    if api_tokens:
        doc["api_tokens"] = api_tokens
    return doc


def write_private(path: Path, doc: dict) -> None:
    """Mode 0600, temp file + rename: no partial file and no moment where others can read the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_settings(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise DeployError(f"--settings {path}: {e.strerror or e}") from None
    except ValueError:
        raise DeployError(f"--settings {path}: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS or not doc.get("device_id"):
        raise DeployError(f"--settings {path}: not a board settings file (picoiot provision --board-settings)")
    return doc


# ------------------------------------------------------------------------------------------------ the bundle
def stage_bundle(kind: str, out: Path, cache: Optional[Path] = None, simulator: bool = False) -> Path:
    """out/ as the board's flash will hold it: iotlib/ and the kind's controller as .mpy, main.py as
    source (MicroPython runs /main.py at boot, not a .mpy). Compiled into `cache` (default out/../firmware; only what
    changed is recompiled). simulator: also the simulated board (picosim), for booting the staged flash on the unix
    port; a board never gets it."""
    cache = cache or out.parent / "firmware"
    build.build_firmware(cache)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    other = "sensors_controller" if kind == "relays" else "relays_controller"
    for p in sorted(cache.iterdir()):
        if p.name.startswith(".") or p.suffix == ".img":
            continue
        if not simulator and build.is_simulator(Path(p.name)):
            continue
        if p.is_dir():
            shutil.copytree(p, out / p.name, ignore=shutil.ignore_patterns(".*"))
        elif p.suffix == ".mpy" and p.stem not in _HOST_ONLY + (other, "main"):
            shutil.copy(p, out / p.name)
    shutil.copy(paths.FIRMWARE / "main.py", out / "main.py")
    return out


def romfs_image(stage: Path, out: Path) -> Path:
    """A ROMFS image of the staged bundle without main.py (it stays on the writable flash, as the settings do)."""
    src = out / "romfs-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(stage, src, ignore=shutil.ignore_patterns("main.py", ".*"))
    img = out / "romfs.img"
    proc = subprocess.run([_mpremote(), "romfs", "--no-mpy", "-o", str(img), "build", str(src)],
                          capture_output=True, text=True)
    shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0:
        raise DeployError(f"mpremote romfs build failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return img


def _mpremote() -> str:
    here = Path(sys.executable).with_name("mpremote")
    if here.exists():
        return str(here)
    found = shutil.which("mpremote")
    if not found:
        raise DeployError("mpremote not found: run ./dev setup (pip install mpremote)")
    return found


def probe(port: str) -> list[str]:
    """The first command: the board answers as MicroPython (and says which board it is)."""
    return ["mpremote", "connect", port, "exec", "import sys; print(sys.implementation.name, sys.implementation._machine)"]


def plan(port: str, settings: Path, stage: Path, romfs: Optional[Path] = None) -> list[list[str]]:
    """Every mpremote command of a deploy, in order. `fs cp` sources are local paths, destinations `:path`."""
    mp = ["mpremote", "connect", port]
    steps = [probe(port)]
    if romfs is not None:
        steps.append(mp + ["romfs", "deploy", str(romfs)])
    else:
        sources = [str(p) for p in sorted(stage.iterdir()) if p.name != "main.py"]
        steps.append(mp + ["fs", "cp", "-r", *sources, ":"])
    steps.append(mp + ["fs", "cp", str(stage / "main.py"), ":main.py"])
    steps.append(mp + ["fs", "cp", str(settings), ":" + SETTINGS_NAME])
    steps.append(mp + ["reset"])
    return steps


def explain_failure(port: str, output: str) -> str:
    """mpremote's failure as one line that says what to do."""
    low = output.lower()
    if "failed to access" in low or "no device found" in low or "could not open port" in low:
        return (f"no board at {port}: plug the Pico W in over USB and pass its port (`mpremote devs` lists them, "
                "e.g. /dev/ttyACM0)")
    if "could not enter raw repl" in low or "raw repl" in low or "timeout" in low:
        return (f"the board at {port} does not answer as MicroPython: flash stock MicroPython for the Pico W "
                "first (docs/hardware.md, \"Flashing MicroPython\")")
    if "romfs is not enabled" in low or "no rom" in low or "partition" in low:
        return (f"the MicroPython on {port} has no ROMFS partition: deploy without --romfs (.mpy files), or build "
                "a firmware with one (picoiot firmware freeze)")
    last = [ln for ln in output.strip().splitlines() if ln.strip()]
    return f"mpremote failed on {port}: {last[-1] if last else 'no output'}"


def run_step(argv: list[str], port: str, probe_timeout: float = 20) -> str:
    """Run one planned mpremote command; DeployError with one line saying what to do if it fails."""
    probe = argv[3:4] == ["exec"]
    argv = [_mpremote()] + argv[1:]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=probe_timeout if probe else 300)
    except subprocess.TimeoutExpired:
        if probe:  # something answers on the port but not as a MicroPython REPL (mpremote would wait for ever)
            raise DeployError(explain_failure(port, "could not enter raw repl")) from None
        raise DeployError(f"mpremote did not finish within 300 s on {port}: unplug and replug the board") from None
    out = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise DeployError(explain_failure(port, out))
    if argv[3:4] == ["exec"] and "micropython" not in out.lower():
        raise DeployError(explain_failure(port, "could not enter raw repl"))
    return out


#: console lines that end the wait: (substring, registered?)
_VERDICTS = (('"msg":"registered"', True), ("picoiot: settings:", False), ("safe mode", False),
             ("MemoryError", False))
#: console lines worth echoing as the likely reason while waiting
_REASONS = ("wifi connect failed", "control plane unreachable", "TLS", "no free flash")


def follow_console(lines: Callable[[], Optional[str]], timeout_s: float, echo: Callable[[str], None]) -> str:
    """Read the board's console (lines() returns a line or None) until it reports registered (→ "") or a reason not
    to wait on (→ that line); after timeout_s → the last reason seen."""
    reason = ""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = lines()
        if line is None:
            continue
        echo(line)
        for needle, ok in _VERDICTS:
            if needle in line:
                return "" if ok else line
        if any(r in line for r in _REASONS):
            reason = line
    return reason or f"no registration within {timeout_s:.0f} s and no error on the console"


def serial_lines(port: str, wait_s: float = 10) -> Callable[[], Optional[str]]:
    """Line reader on the board's USB serial, reopened after the reset re-enumerates it."""
    import serial  # pyserial: mpremote's own dependency

    end = time.monotonic() + wait_s
    while True:
        try:
            s = serial.Serial(port, 115200, timeout=0.5)
            break
        except (serial.SerialException, OSError):
            if time.monotonic() > end:
                raise DeployError(f"the board did not come back on {port} after the reset: check `mpremote devs`")
            time.sleep(0.2)

    def read() -> Optional[str]:
        b = s.readline()
        return b.decode(errors="replace").rstrip() if b else None
    return read


# ------------------------------------------------------------------------------------------------ freeze
def freeze(kind: str, out: Path) -> Path:
    """out/manifest.py plus the sources it names (what bundles/<kind>/manifest.py names: iotlib and the kind's
    controller) — self-contained, for `make BOARD=RPI_PICO_W FROZEN_MANIFEST=out/manifest.py` in ports/rp2."""
    if kind not in KINDS:
        raise DeployError("--kind must be relays or sensors")
    shutil.rmtree(out / "src", ignore_errors=True)
    src = out / "src"
    firmware = [f for f in bundles.read(kind) if f.base == paths.FIRMWARE]
    for f in firmware:
        (src / f.rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f.src, src / f.rel)
    packages = sorted({f.top for f in firmware if "/" in f.rel})
    modules = sorted(f.rel for f in firmware if "/" not in f.rel)
    lines = ["# picoiot firmware freeze: %s frozen into the firmware image." % ", ".join(
                 packages + [m[:-3] for m in modules]),
             "# Frozen bytecode runs from flash: neither the code nor its names take heap.",
             "# Build: make -C ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=%s" % (out.resolve() / "manifest.py"),
             "# then copy main.py and settings.json with `picoiot deploy --frozen`.",
             'include("$(PORT_DIR)/boards/manifest.py")  # the port\'s own frozen modules (asyncio, ...)']
    for pkg in packages:  # files relative to the package, as MicroPython's manifestfile reads them
        files = [f.rel.split("/", 1)[1] for f in firmware if f.top == pkg]
        lines.append('package("%s", files=%r, base_path="src", opt=3)' % (pkg, files))
    lines += ['module("%s", base_path="src", opt=3)' % m for m in modules]
    lines.append("")
    (out / "manifest.py").write_text("\n".join(lines))
    return out / "manifest.py"


# ------------------------------------------------------------------------------------------------ CLI
def deploy(port: str = typer.Option(..., "--port", help="the board's serial port, e.g. /dev/ttyACM0"),
           settings: Path = typer.Option(..., "--settings", help="board settings file (picoiot provision "
                                         "--board-settings)"),
           romfs: bool = typer.Option(False, "--romfs", help="the bundle as a ROMFS image (MicroPython >= 1.25 with "
                                      "a ROM partition): bytecode runs from flash, not from the heap"),
           frozen: bool = typer.Option(False, "--frozen", help="the firmware has the bundle frozen in (picoiot "
                                       "firmware freeze): copy only main.py and the settings"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print every mpremote command, run none"),
           build_dir: Path = typer.Option(Path("build/deploy"), help="where the bundle is staged"),
           wait: float = typer.Option(120, help="seconds to follow the console for the registration"),
           probe_timeout: float = typer.Option(20, help="seconds the board gets to answer as MicroPython")) -> None:
    """Put picoiot on a Pico W: the bundle, main.py and the settings file; reset; follow the console until the
    device registers (or say why it did not)."""
    try:
        doc = read_settings(settings)
        if romfs and frozen:
            raise DeployError("--romfs and --frozen exclude each other")
        if not dry_run:  # fail fast, before building anything: is there a MicroPython board on that port?
            run_step(probe(port), port, probe_timeout)
        stage = stage_bundle(doc["kind"], build_dir / "flash")
        img = romfs_image(stage, build_dir) if romfs else None
        steps = plan(port, settings.resolve(), stage, img)
        if frozen:
            steps = [s for s in steps if not (s[3:5] == ["fs", "cp"] and s[-1] == ":")]
        if dry_run:
            for s in steps:
                typer.echo(" ".join(_quote(a) for a in s))
            typer.echo(f"# then: follow the console on {port} until the device reports registered")
            return
        for s in steps[1:]:
            typer.echo("$ " + " ".join(_quote(a) for a in s), err=True)
            run_step(s, port, probe_timeout)
        typer.echo(f"reset; following the console on {port} (up to {wait:.0f} s)…", err=True)
        why = follow_console(serial_lines(port), wait, lambda ln: typer.echo(ln, err=True))
        if why:
            raise DeployError(f"the device did not register: {why}")
        typer.echo(f"{doc['device_id']} registered")
    except DeployError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)
    except build.BuildError as e:
        typer.secho(f"error: building the bundle: {e}", fg="red", err=True)
        raise typer.Exit(1)


def _quote(a: str) -> str:
    import shlex
    return shlex.quote(a)


def firmware_freeze(kind: str = typer.Option(..., "--kind", help="relays | sensors"),
                    out: Path = typer.Option(Path("build/freeze"), "--out", help="output directory")) -> None:
    """Write a MicroPython manifest.py (and the sources it names) freezing iotlib and the controller."""
    try:
        m = freeze(kind, out)
    except DeployError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {m}")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    for group in app.registered_groups:  # `picoiot firmware freeze`
        if group.name == "firmware" and group.typer_instance is not None:
            group.typer_instance.command("freeze")(firmware_freeze)
