"""`picoiot ota keygen|set-key|publish|assign|status|rollout …` (docs/ota.md).

The private key never leaves the publisher's machine: `publish` signs the manifest locally and uploads the manifest
text, its signature and the files; the control plane checks the signature against the namespace's public key.
The functions below the commands' level (`publish`, `assign`, `rollout_create`, …) take a URL and a token and are what
tests and benches drive; the commands add the remote commands' options and their token minting (`picoiot.remote`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import typer

from .cliopts import CliError, DataDir, Namespace, Token, Url
from .remote import Remote, resolve

ota_app = typer.Typer(help="Over-the-air updates: signing keys, releases, assignments.", no_args_is_help=True)


class OTACliError(CliError):
    """A release or a stage list that cannot be used (the server's refusals are `picoiot.remote.RemoteError`)."""


def keygen(path: Path) -> str:
    """Write a new Ed25519 private key (hex seed) to path, mode 0600, never over an existing file; the public key hex."""
    from nacl.signing import SigningKey
    sk = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sk.encode().hex() + "\n")
    return sk.verify_key.encode().hex()


def load_key(path: Path):
    from nacl.signing import SigningKey
    try:
        return SigningKey(bytes.fromhex(path.read_text().strip()))
    except (ValueError, OSError) as e:
        raise OTACliError(f"cannot read the private key {path}: {type(e).__name__}")


def build_release(src: Path, version: str) -> tuple[str, dict[str, bytes]]:
    """(manifest text, {sha256: bytes}) for every file under src (paths relative to it, sorted)."""
    if not src.is_dir():
        raise OTACliError(f"{src} is not a directory")
    files, blobs = [], {}
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        files.append({"path": p.relative_to(src).as_posix(), "sha256": sha, "size": len(data)})
        blobs[sha] = data
    if not files:
        raise OTACliError(f"{src} holds no files")
    return json.dumps({"version": version, "files": files}, separators=(",", ":")), blobs


def publish(server: str, token: str, ns: str, src: Path, version: str, key_path: Path) -> dict:
    """Sign and upload a release; sets the namespace's public key to this key's if none is set yet."""
    sk = load_key(key_path)
    text, blobs = build_release(src, version)
    sig = sk.sign(text.encode()).signature.hex()
    with Remote(server, token) as api:
        base = f"/api/v1/namespaces/{ns}/ota"
        for sha, data in blobs.items():
            api.call("PUT", f"{base}/files/{sha}", f"upload {sha[:12]}", content=data,
                     headers={"Content-Type": "application/octet-stream"})
        return api.call("POST", f"{base}/releases", "publish", json={"manifest": text, "signature": sig})


def set_key(server: str, token: str, ns: str, public_key: str) -> dict:
    with Remote(server, token) as api:
        return api.call("PUT", f"/api/v1/namespaces/{ns}/ota/key", json={"public_key": public_key})


def assign(server: str, token: str, ns: str, version: Optional[str], device: Optional[str],
           group: Optional[str]) -> dict:
    with Remote(server, token) as api:
        return api.call("PUT", f"/api/v1/namespaces/{ns}/ota/assignments",
                        json={"version": version, "device": device, "group": group})


def status(server: str, token: str, ns: str, device: Optional[str] = None) -> dict:
    with Remote(server, token) as api:
        return api.call("GET", f"/api/v1/namespaces/{ns}/ota/status",
                        params={"device": device} if device else None)


@ota_app.command("keygen")
def keygen_cmd(key: Path = typer.Argument(..., help="private key file to create (mode 0600; never overwritten)")):
    """Create a signing key pair; prints the public key (put it in the devices' config and `picoiot ota set-key`)."""
    try:
        typer.echo(keygen(key))
    except FileExistsError:
        raise OTACliError(f"{key} exists: a signing key is never overwritten") from None


@ota_app.command("set-key")
def set_key_cmd(public_key: str, url: Optional[str] = Url, token: Optional[str] = Token,
                data_dir: Optional[Path] = DataDir, namespace: str = Namespace):
    """Tell the control plane which public key this namespace's releases are signed with."""
    typer.echo(json.dumps(set_key(*resolve(url, token, data_dir, namespace, "admin"), namespace, public_key)))


@ota_app.command("publish")
def publish_cmd(src: Path = typer.Argument(..., help="directory whose files make the release"),
                version: str = typer.Option(..., "--version"), key: Path = typer.Option(..., "--key"),
                url: Optional[str] = Url, token: Optional[str] = Token, data_dir: Optional[Path] = DataDir,
                namespace: str = Namespace):
    """Sign DIR's files as release VERSION and upload it."""
    typer.echo(json.dumps(publish(*resolve(url, token, data_dir, namespace, "admin"), namespace, src, version, key)))


@ota_app.command("assign")
def assign_cmd(version: Optional[str] = typer.Argument(None, help="release (omit with --clear)"),
               device: Optional[str] = typer.Option(None, "--device"), group: Optional[str] = typer.Option(None, "--group"),
               clear: bool = typer.Option(False, "--clear", help="remove the assignment"),
               url: Optional[str] = Url, token: Optional[str] = Token, data_dir: Optional[Path] = DataDir,
               namespace: str = Namespace):
    """Assign a release to a device or group."""
    if (version is None) != clear:
        raise OTACliError("give a VERSION or --clear")
    typer.echo(json.dumps(assign(*resolve(url, token, data_dir, namespace, "admin"), namespace, version, device,
                                 group)))


@ota_app.command("status")
def status_cmd(device: Optional[str] = typer.Option(None, "--device"), url: Optional[str] = Url,
               token: Optional[str] = Token, data_dir: Optional[Path] = DataDir, namespace: str = Namespace):
    """Assigned / running / pending release and the last report, per device."""
    for d in status(*resolve(url, token, data_dir, namespace, "viewer"), namespace, device)["devices"]:
        rep = d["report"] or {}
        typer.echo(f"{d['device_id']}: running={d['running']} assigned={d['assigned']} pending={d['pending']} "
                   f"last={rep.get('status')}:{rep.get('version')}")


def register(app: typer.Typer) -> None:
    app.add_typer(ota_app, name="ota")


# ---------------------------------------------------------------- rollouts (docs/ota.md, Rollouts)
rollout_app = typer.Typer(help="Staged rollouts: create, status, pause, resume, abort.", no_args_is_help=True)
ota_app.add_typer(rollout_app, name="rollout")


def parse_stages(text: str) -> list[dict]:
    """"1,25%,100%" (cumulative: a device count or a percentage of the target) → stages; soak applies to each."""
    stages = []
    for part in (p.strip() for p in text.split(",")):
        try:
            stages.append({"percent": float(part[:-1])} if part.endswith("%") else {"devices": int(part)})
        except ValueError:
            raise OTACliError(f"bad stage {part!r}: give a device count (1) or a percentage (25%)")
    return stages


def rollout_call(server: str, token: str, method: str, path: str, body: Optional[dict] = None) -> dict:
    with Remote(server, token) as api:
        return api.call(method, path, json=body)


def rollout_create(server: str, token: str, ns: str, version: str, target: dict, stages: list[dict], soak_s: float,
                   threshold: float, allow_downgrade: bool) -> dict:
    body = {"version": version, "target": target, "stages": [{**s, "soak_s": soak_s} for s in stages],
            "failure_threshold": threshold, "allow_downgrade": allow_downgrade}
    return rollout_call(server, token, "POST", f"/api/v1/namespaces/{ns}/ota/rollouts", body)


def format_rollout(r: dict, devices: bool = True) -> list[str]:
    lines = [f"rollout {r['id']}: {r['version']} → {json.dumps(r['target'])}: {r['state']}, stage "
             f"{r['stage'] + 1}/{len(r['stages'])}" + (f" ({r['reason']})" if r.get("reason") else "")]
    for s in r.get("stage_detail", []):
        size = f"{s['percent']:g}%" if s.get("percent") is not None else f"{s['devices']} device(s)"
        counts = " ".join(f"{k}={v}" for k, v in sorted(s["counts"].items()))
        lines.append(f"  stage {s['stage'] + 1} [{size}, soak {s.get('soak_s', 0):g}s]: {counts}")
    if devices:
        for d in r.get("devices", []):
            lines.append(f"    {d['device_id']}: stage {d['stage'] + 1} {d['status']}"
                         + (f" ({d['reason']})" if d["reason"] else ""))
    return lines


@rollout_app.command("create")
def rollout_create_cmd(version: str = typer.Argument(..., help="the release"),
                       group: Optional[str] = typer.Option(None, "--group"),
                       device: Optional[list[str]] = typer.Option(None, "--device", help="repeatable"),
                       all_: bool = typer.Option(False, "--all", help="every device of the namespace"),
                       stages: str = typer.Option("1,5%,25%,100%", "--stages",
                                                  help="cumulative stages: a device count or a percentage"),
                       soak: float = typer.Option(600, "--soak", help="seconds each device must stay healthy"),
                       threshold: float = typer.Option(0.2, "--threshold", help="failed share (0-1) that pauses"),
                       allow_downgrade: bool = typer.Option(False, "--allow-downgrade"),
                       url: Optional[str] = Url, token: Optional[str] = Token, data_dir: Optional[Path] = DataDir,
                       namespace: str = Namespace):
    """Start a staged rollout of VERSION to --all, a --group or --device ids."""
    targets = [t for t in ({"namespace": True} if all_ else None, {"group": group} if group else None,
                           {"devices": device} if device else None) if t]
    if len(targets) != 1:
        raise OTACliError("give exactly one of --all, --group, --device")
    st = parse_stages(stages)
    r = rollout_create(*resolve(url, token, data_dir, namespace, "admin"), namespace, version, targets[0], st, soak,
                       threshold, allow_downgrade)
    typer.echo("\n".join(format_rollout(r, devices=False)))


@rollout_app.command("status")
def rollout_status_cmd(rollout_id: Optional[int] = typer.Argument(None, help="omit to list rollouts"),
                       as_json: bool = typer.Option(False, "--json"), url: Optional[str] = Url,
                       token: Optional[str] = Token, data_dir: Optional[Path] = DataDir, namespace: str = Namespace):
    """One rollout per stage and per device (status, reason), or the list of rollouts."""
    path = f"/api/v1/namespaces/{namespace}/ota/rollouts" + (f"/{rollout_id}" if rollout_id else "")
    r = rollout_call(*resolve(url, token, data_dir, namespace, "viewer"), "GET", path)
    if as_json:
        typer.echo(json.dumps(r, indent=1))
    elif rollout_id:
        typer.echo("\n".join(format_rollout(r)))
    else:
        for x in r["rollouts"]:
            typer.echo(format_rollout(x, devices=False)[0])


def _action(action: str, rollout_id: int, body: dict, url: Optional[str], token: Optional[str],
            data_dir: Optional[Path], namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/ota/rollouts/{rollout_id}/{action}"
    r = rollout_call(*resolve(url, token, data_dir, namespace, "admin"), "POST", path, body)
    typer.echo("\n".join(format_rollout(r, devices=False)))


@rollout_app.command("pause")
def rollout_pause_cmd(rollout_id: int, reason: str = typer.Option("", "--reason"), url: Optional[str] = Url,
                      token: Optional[str] = Token, data_dir: Optional[Path] = DataDir, namespace: str = Namespace):
    """Stop offering the release; devices already installing finish."""
    _action("pause", rollout_id, {"reason": reason}, url, token, data_dir, namespace)


@rollout_app.command("resume")
def rollout_resume_cmd(rollout_id: int, version: Optional[str] = typer.Option(None, "--version",
                                                                              help="continue with a fixed release"),
                       url: Optional[str] = Url, token: Optional[str] = Token, data_dir: Optional[Path] = DataDir,
                       namespace: str = Namespace):
    """Run again (failures before the resume no longer count); with --version, take every device to that release."""
    _action("resume", rollout_id, {"version": version}, url, token, data_dir, namespace)


@rollout_app.command("abort")
def rollout_abort_cmd(rollout_id: int, reason: str = typer.Option("", "--reason"), url: Optional[str] = Url,
                      token: Optional[str] = Token, data_dir: Optional[Path] = DataDir, namespace: str = Namespace):
    """End it for good: devices that have not started keep their version."""
    _action("abort", rollout_id, {"reason": reason}, url, token, data_dir, namespace)
