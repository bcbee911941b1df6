"""`picoiot ota keygen|publish|assign|status` (docs/ota.md).

The private key never leaves the publisher's machine: `publish` signs the manifest locally and uploads the manifest
text, its signature and the files; the control plane checks the signature against the namespace's public key.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import httpx
import typer

ota_app = typer.Typer(help="Over-the-air updates: signing keys, releases, assignments.", no_args_is_help=True)

_SERVER = typer.Option("http://127.0.0.1:8080", "--url", "--server", envvar="PICOIOT_URL",
                       help="control plane base URL (--server: the old name)")
_TOKEN = typer.Option(..., "--token", envvar="PICOIOT_TOKEN", help="operator token (admin to publish/assign)")
_NS = typer.Option("default", "--namespace", "-n")


class OTACliError(Exception):
    pass


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


def _check(r: httpx.Response, what: str) -> dict:
    if r.status_code >= 400:
        try:
            err = r.json().get("error")
        except ValueError:
            err = r.text[:200]
        raise OTACliError(f"{what}: HTTP {r.status_code}: {err}")
    return r.json() if r.content else {}


def publish(server: str, token: str, ns: str, src: Path, version: str, key_path: Path) -> dict:
    """Sign and upload a release; sets the namespace's public key to this key's if none is set yet."""
    sk = load_key(key_path)
    text, blobs = build_release(src, version)
    sig = sk.sign(text.encode()).signature.hex()
    base = f"{server.rstrip('/')}/api/v1/namespaces/{ns}/ota"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for sha, data in blobs.items():
            _check(c.put(f"{base}/files/{sha}", content=data,
                         headers={"Content-Type": "application/octet-stream"}), f"upload {sha[:12]}")
        return _check(c.post(f"{base}/releases", json={"manifest": text, "signature": sig}), "publish")


def set_key(server: str, token: str, ns: str, public_key: str) -> dict:
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        return _check(c.put(f"{server.rstrip('/')}/api/v1/namespaces/{ns}/ota/key", json={"public_key": public_key}),
                      "set key")


def assign(server: str, token: str, ns: str, version: Optional[str], device: Optional[str],
           group: Optional[str]) -> dict:
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        return _check(c.put(f"{server.rstrip('/')}/api/v1/namespaces/{ns}/ota/assignments",
                             json={"version": version, "device": device, "group": group}), "assign")


def status(server: str, token: str, ns: str, device: Optional[str] = None) -> dict:
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        return _check(c.get(f"{server.rstrip('/')}/api/v1/namespaces/{ns}/ota/status",
                            params={"device": device} if device else None), "status")


def _run(fn, *args):
    try:
        return fn(*args)
    except (OTACliError, httpx.HTTPError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


@ota_app.command("keygen")
def keygen_cmd(key: Path = typer.Argument(..., help="private key file to create (mode 0600; never overwritten)")):
    """Create a signing key pair; prints the public key (put it in the devices' config and `picoiot ota set-key`)."""
    typer.echo(_run(keygen, key))


@ota_app.command("set-key")
def set_key_cmd(public_key: str, server: str = _SERVER, token: str = _TOKEN, namespace: str = _NS):
    """Tell the control plane which public key this namespace's releases are signed with."""
    typer.echo(json.dumps(_run(set_key, server, token, namespace, public_key)))


@ota_app.command("publish")
def publish_cmd(src: Path = typer.Argument(..., help="directory whose files make the release"),
                version: str = typer.Option(..., "--version"), key: Path = typer.Option(..., "--key"),
                server: str = _SERVER, token: str = _TOKEN, namespace: str = _NS):
    """Sign DIR's files as release VERSION and upload it."""
    typer.echo(json.dumps(_run(publish, server, token, namespace, src, version, key)))


@ota_app.command("assign")
def assign_cmd(version: Optional[str] = typer.Argument(None, help="release (omit with --clear)"),
               device: Optional[str] = typer.Option(None, "--device"), group: Optional[str] = typer.Option(None, "--group"),
               clear: bool = typer.Option(False, "--clear", help="remove the assignment"),
               server: str = _SERVER, token: str = _TOKEN, namespace: str = _NS):
    """Assign a release to a device or group."""
    if (version is None) != clear:
        typer.echo("error: give a VERSION or --clear", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(_run(assign, server, token, namespace, version, device, group)))


@ota_app.command("status")
def status_cmd(device: Optional[str] = typer.Option(None, "--device"), server: str = _SERVER, token: str = _TOKEN,
               namespace: str = _NS):
    """Assigned / running / pending release and the last report, per device."""
    for d in _run(status, server, token, namespace, device)["devices"]:
        rep = d["report"] or {}
        typer.echo(f"{d['device_id']}: running={d['running']} assigned={d['assigned']} pending={d['pending']} "
                   f"last={rep.get('status')}:{rep.get('version')}")


def register(app: typer.Typer) -> None:
    app.add_typer(ota_app, name="ota")
