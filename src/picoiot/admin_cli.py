"""`picoiot provision | token | ui-link`: the secrets' administration, on the server's data directory.

These commands need no running server: they read the signing and enrollment keys from `--data-dir` and write to the
database directly, each write with its audit entry (subject `cli:<user>`, the data directory's admin power).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from .cliopts import DataDir, DbSchema, DbUrl, fail, server_info, server_url, settings_for
from .server.settings import NAME_RE, Settings, default_data_dir


def _existing_secrets(data_dir: Optional[Path]) -> Path:
    """The data dir of a server that has run (its secrets exist), else a one-line error: minting from a secret made
    up here would give tokens no server accepts."""
    from .server.settings import SECRETS_FILE
    ddir = data_dir or default_data_dir()
    if not (ddir / SECRETS_FILE).exists():
        fail(f"no server secrets in {ddir}/: pass the server's --data-dir (or PICOIOT_DATA_DIR; the demo's is "
             "printed in .picoiot-demo/demo.env), or run `picoiot server` there first")
    return ddir


def provision(device_id: str = typer.Argument(..., help="device id: 1–64 of [A-Za-z0-9_.-]"),
              namespace: str = typer.Option("default", "--namespace", "-n"),
              type_: Optional[str] = typer.Option(None, "--type", help="device type (relays, sensors, …)"),
              group: Optional[str] = typer.Option(None, help="config group"),
              individual: bool = typer.Option(False, help="a random key stored by the server instead of a derived one"),
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the key file here (0600)"),
              create_namespace: bool = typer.Option(True, help="create the namespace if it does not exist"),
              kind: Optional[str] = typer.Option(None, "--kind", help="relays | sensors: the controller the board "
                                                 "runs (also the device type)"),
              board_settings: Optional[Path] = typer.Option(None, "--board-settings", help="write the board's "
                                                            "settings file here (0600), for picoiot deploy"),
              wifi_ssid: list[str] = typer.Option([], "--wifi-ssid", help="Wi-Fi network (repeat: tried in order)"),
              wifi_password: list[str] = typer.Option([], "--wifi-password", envvar="PICOIOT_WIFI_PASSWORD",
                                                      help="its password, one per --wifi-ssid ('' for open)"),
              discovery_url: Optional[str] = typer.Option(None, "--discovery-url", help="the URL the device "
                                                          "registers at [default: the server's, + /api/devices]"),
              ca: Optional[Path] = typer.Option(None, "--ca", help="PEM of the CA that signed the server's TLS "
                                                "certificate (stored as DER in the settings)"),
              ota_key: Optional[str] = typer.Option(None, "--ota-key", help="Ed25519 public key (64 hex) OTA "
                                                    "releases are signed with"),
              api_token: list[str] = typer.Option([], "--api-token", help="viewer|operator|admin: a static token "
                                                  "for the device's local API, printed once, stored as SHA-256"),
              data_dir: Optional[Path] = DataDir, db: Optional[str] = DbUrl,
              db_schema: Optional[str] = DbSchema) -> None:
    """Enroll a device and print (or write) its key file {device_id, device_key, namespace, service_discovery_url};
    with --board-settings, also write the complete settings file the board reads (docs/hardware.md)."""
    from .server.app import seed_device_types
    from .server.changes import Events
    from .server.core import ControlPlane
    from .server.db import migrate
    from .server.errors import ApiError
    from .server.refusals import Refused
    from .server.models import ProvisionIn
    from .server import operators

    if not NAME_RE.match(device_id) or not NAME_RE.match(namespace):
        fail("device id and namespace: 1-64 characters of A-Z a-z 0-9 _ . -")
    if kind is not None and kind not in ("relays", "sensors"):
        fail("--kind must be relays or sensors")
    type_ = type_ or kind
    if board_settings is not None:
        if kind is None:
            fail("--board-settings needs --kind relays|sensors")
        if not wifi_ssid:
            fail("--board-settings needs --wifi-ssid and --wifi-password (the network the board joins)")
        if len(wifi_password) != len(wifi_ssid):
            fail("give one --wifi-password per --wifi-ssid ('' for an open network)")
        for i, (ssid, pw) in enumerate(zip(wifi_ssid, wifi_password)):
            if not 1 <= len(ssid) <= 32 or not (pw == "" or 8 <= len(pw) <= 64):
                fail(f"--wifi-ssid/--wifi-password #{i + 1}: SSID 1-32 characters, password empty or 8-64")
        for r in api_token:
            if r not in ("viewer", "operator", "admin"):
                fail("--api-token: viewer, operator or admin")
        if ca is not None and not ca.is_file():
            fail(f"--ca {ca}: no such file")
    settings = settings_for(data_dir, db, db_schema)
    if settings.secrets.enrollment_key(namespace) is None:
        if not create_namespace:
            fail(f"unknown namespace {namespace!r}")
        settings.secrets.add_namespace(namespace)
    cp = ControlPlane(settings)
    try:
        migrate(cp.db.engine, settings)
        cp.db.run_sync(seed_device_types)
        body = ProvisionIn(device_id=device_id, device_type=type_, group=group,
                           key_mode="individual" if individual else "derived")
        def enrol(conn):
            k = operators.provision(conn, Events(cp.notifier), cp, namespace, body,
                                    settings.secrets.enrollment_key(namespace))
            _audit_cli(conn, namespace, "POST", f"/api/v1/namespaces/{namespace}/devices", "enrolment", device_id,
                       201, body.model_dump(mode="json"), {"device_id": device_id, "key_mode": body.key_mode})
            return k
        key = cp.db.run_sync(enrol)  # the enrolment and its audit entry in one transaction
    except (ApiError, Refused) as e:
        fail(f"{e.error}")
    finally:
        cp.db.dispose()
    doc = {"device_id": device_id, "device_key": key, "namespace": namespace,
           "service_discovery_url": discovery_url or f"{settings.public_url or server_url(data_dir)}/api/devices"}
    if board_settings is not None:
        _write_board_settings(board_settings, doc, kind, list(zip(wifi_ssid, wifi_password)), ca, ota_key, api_token,
                              server_info(data_dir).get("ntp"))
    text = json.dumps(doc, indent=1)
    if out is None:
        typer.echo(text)
    else:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(out, 0o600)
        typer.echo(f"wrote {out}")


def _write_board_settings(path: Path, key: dict, kind: str, wifi: list, ca: Optional[Path], ota_key: Optional[str],
                          roles: list[str], ntp: Optional[str] = None) -> None:
    import hashlib
    import secrets

    from .deploy import DeployError, board_settings, write_private
    tokens = []
    for role in roles:
        tok = secrets.token_urlsafe(24)
        # the form the device keeps static tokens in: hex SHA-256 of the UTF-8 token (iotlib.auth.hash_token)
        tokens.append({"sha256": hashlib.sha256(tok.encode()).hexdigest(), "role": role})
        typer.echo(f"{role} API token (shown once, only its hash is stored): {tok}", err=True)
    try:
        write_private(path, board_settings(key, kind, wifi, ca, ota_key, api_tokens=tokens,
                                           ntp_servers=[ntp, "pool.ntp.org"] if ntp else None))
    except DeployError as e:
        fail(str(e))
    typer.echo(f"wrote {path} (board settings; picoiot deploy --settings {path})", err=True)


def _audit_cli(conn, ns: str, method: str, path: str, resource: str, device_id: Optional[str], status: int,
               request: Any, after: Any) -> None:
    """An audit entry for a CLI command that works on the data directory itself (no server, no token): the
    subject is the local user, with the data directory's full (admin) power."""
    import getpass

    from .server import audit
    from .server.db import now_ms
    audit.append(conn, ns=ns, ts=now_ms(), sub=f"cli:{getpass.getuser()}", role="admin", via="cli", method=method,
                 path=path, resource=resource, device_id=device_id, status=status,
                 summary={"request": audit.redact(request), "before": None, "after": audit.redact(after)})


def _audit_offline(settings: Settings, ns: str, resource: str, request: Any) -> None:
    """Record a token minted from the data directory (the token itself never enters the log)."""
    from .server.db import Database, migrate
    db = Database(settings)
    try:
        migrate(db.engine, settings)
        db.run_sync(lambda conn: _audit_cli(conn, ns, "POST", f"cli:{resource}", resource, None, 200, request, None))
    except Exception as e:  # the command still works; say that its record is missing
        typer.secho(f"warning: audit entry not written ({type(e).__name__})", fg="yellow", err=True)
    finally:
        db.dispose()


def token(role: str = typer.Option(..., "--role", help="viewer | operator | admin"),
          namespace: str = typer.Option("default", "--namespace", "-n", help="namespace, or '*' for all (admin)"),
          device: Optional[str] = typer.Option(None, "--device", help="a token for this device's own local API"),
          ttl: int = typer.Option(3600, "--ttl", help="lifetime, seconds"),
          sub: str = typer.Option("cli", help="subject (who the token is for)"),
          data_dir: Optional[Path] = DataDir, db: Optional[str] = DbUrl, db_schema: Optional[str] = DbSchema) -> None:
    """Print a token: for the control plane's operators' API, or (--device) for a device's local REST/WS API."""
    from .server.auth import ROLES, derive_device_key, device_local_token, issue_token

    if role not in ROLES:
        fail(f"role must be one of {', '.join(ROLES)}")
    if ttl <= 0:
        fail("--ttl must be positive")
    settings = settings_for(_existing_secrets(data_dir), db, db_schema)
    if device is None:
        if namespace != "*" and settings.secrets.enrollment_key(namespace) is None:
            fail(f"unknown namespace {namespace!r}")
        _audit_offline(settings, namespace, "token", {"role": role, "namespace": namespace, "sub": sub, "ttl": ttl})
        typer.echo(issue_token(settings.secrets.signing_key, sub, namespace, role, ttl))
        return
    enrollment = settings.secrets.enrollment_key(namespace)
    if enrollment is None:
        fail(f"unknown namespace {namespace!r}")
    key = _individual_key(settings, namespace, device) or derive_device_key(enrollment, device)
    typer.echo(device_local_token(key, device, role, ttl, sub=sub))


def ui_link(role: str = typer.Option("operator", "--role", help="viewer | operator | admin"),
            namespace: str = typer.Option("default", "--namespace", "-n", help="namespace, or * for all"),
            sub: str = typer.Option("cli", help="subject (who signs in)"),
            ttl: int = typer.Option(900, help="how long the link can be used, seconds"),
            url: Optional[str] = typer.Option(None, "--url", envvar="PICOIOT_URL", help="server URL"),
            data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="server data dir (secrets)")) -> None:
    """Print a one-time sign-in link to the dashboard (/ui/); it works once, within --ttl."""
    from .server.auth import ROLES
    from .server.ui.session import issue_ticket
    if role not in ROLES:
        fail(f"--role must be one of {', '.join(ROLES)}")
    settings = Settings.from_data_dir(data_dir or default_data_dir())
    base = (url or server_url(data_dir)).rstrip("/")
    typer.echo(f"{base}/ui/login?ticket={issue_ticket(settings.secrets.signing_key, sub, namespace, role, ttl)}")


def _individual_key(settings: Settings, ns: str, dev: str) -> str | None:
    import sqlalchemy as sa

    from .server import db as tables
    from .server.db import make_engine
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            d = tables.devices
            return conn.execute(sa.select(d.c.device_key).where(d.c.ns == ns, d.c.device_id == dev)).scalar()
    except Exception:  # no database yet: derived keys need none
        return None
    finally:
        engine.dispose()


def register(app: typer.Typer) -> None:
    app.command("provision")(provision)
    app.command("token")(token)
    app.command("ui-link")(ui_link)
