"""`picoiot server | provision | token | devices | config | state | alarms` — the control plane's commands.

`server`, `provision` and `token` work on the data directory (secrets + default SQLite database) directly.
`devices`, `config`, `state` and `alarms` talk to a running server over HTTP with a token: `--token`/`$PICOIOT_TOKEN`,
or one minted for the call from the data directory's signing key (so on the server's own box no token is needed).
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Optional

import typer

from .server.settings import NAME_RE, Settings, default_data_dir

SERVER_INFO = "server.json"  # written by `picoiot server`: where it listens, so the other commands find it

DataDir = typer.Option(None, "--data-dir", envvar="PICOIOT_DATA_DIR",
                       help="secrets + default SQLite database [default: ./.picoiot]")
DbUrl = typer.Option(None, "--db", envvar="PICOIOT_DB", help="database URL (sqlite:///… or postgresql://…)")
DbSchema = typer.Option(None, "--db-schema", envvar="PICOIOT_DB_SCHEMA", help="PostgreSQL schema to use")


def _settings(data_dir: Optional[Path], db: Optional[str], db_schema: Optional[str] = None, **kw) -> Settings:
    return Settings.from_data_dir(data_dir or default_data_dir(), db_url=db, db_schema=db_schema, **kw)


def _server_url(data_dir: Optional[Path]) -> str:
    try:
        return json.loads(((data_dir or default_data_dir()) / SERVER_INFO).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return "http://127.0.0.1:8080"


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _existing_secrets(data_dir: Optional[Path]) -> Path:
    """The data dir of a server that has run (its secrets exist), else a one-line error: minting from a secret made
    up here would give tokens no server accepts."""
    from .server.settings import SECRETS_FILE
    ddir = data_dir or default_data_dir()
    if not (ddir / SECRETS_FILE).exists():
        _fail(f"no server secrets in {ddir}/: pass the server's --data-dir (or PICOIOT_DATA_DIR; the demo's is "
              "printed in .picoiot-demo/demo.env), or run `picoiot server` there first")
    return ddir


def _check_database(settings: Settings) -> None:
    """Connect once before serving: a wrong URL is one line that names the database, not a startup traceback."""
    import sqlalchemy as sa

    from .server.db import make_engine
    shown = sa.make_url(settings.db_url).render_as_string(hide_password=True)
    try:
        engine = make_engine(settings)
    except Exception as e:  # a malformed URL, an unknown driver
        _fail(f"--db {shown}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        with engine.connect():
            pass
    except Exception as e:
        cause = getattr(e, "orig", None) or e
        lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        _fail(f"cannot connect to the database {shown}: {' — '.join(lines) if lines else type(cause).__name__}")
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------------ server
def server(db: Optional[str] = DbUrl, host: str = typer.Option("127.0.0.1", help="address to bind"),
           port: int = typer.Option(8080, help="TCP port (0 = any free port)"),
           sntp_port: Optional[int] = typer.Option(None, help="also answer SNTP on this UDP port"),
           data_dir: Optional[Path] = DataDir, public_url: Optional[str] = typer.Option(
               None, help="base URL devices use to reach this server (default: the URL of each request)"),
           db_schema: Optional[str] = DbSchema,
           sweep_interval: float = typer.Option(1.0, help="seconds between liveness flush / offline sweeps"),
           heartbeat_flush: float = typer.Option(1.0, help="write last_seen every N s (0 = on every heartbeat)"),
           token_ttl: int = typer.Option(3600, help="device token lifetime, seconds"),
           ttl_slack: int = typer.Option(Settings.ttl_slack_s, help="seconds a device may be late beyond 3 missed "
                                         "heartbeats before it is offline (slow Wi-Fi reconnects)"),
           workers: int = typer.Option(1, help="server processes sharing the port (more than 1: PostgreSQL only)"),
           max_requests: int = typer.Option(Settings.max_requests_in_flight,
                                            help="requests worked on at once per process; beyond: 503"),
           max_longpolls: int = typer.Option(10_000, help="long-polls waiting at once per process; beyond: 503"),
           tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve HTTPS"),
           tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
           challenge_rate: float = typer.Option(Settings.challenges_per_address_per_s,
                                                help="registration challenges per second per client address after "
                                                     f"a burst of {Settings.challenges_per_address_burst}; beyond: "
                                                     "429 (0 = no limit)"),
           fleet_tick: float = typer.Option(Settings.fleet_tick_s,
                                            help="seconds between rollout evaluations / alert rule checks"),
           alert_group_wait: float = typer.Option(Settings.alert_group_wait_s,
                                                  help="seconds a notification waits for more alerts to group"),
           telemetry_raw_retention: int = typer.Option(Settings.telemetry_raw_retention_s,
                                                       help="seconds raw telemetry readings are kept"),
           telemetry_agg_retention: int = typer.Option(Settings.telemetry_agg_retention_s,
                                                       help="seconds 1-minute telemetry aggregates are kept"),
           log_level: str = typer.Option("info", help="debug | info | warning | error (to stderr)")) -> None:
    """Run the control plane (discovery, config, state, heartbeat, alarms[, SNTP]) until SIGTERM/SIGINT."""
    import logging

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail("--log-level: debug, info, warning or error")
    if telemetry_raw_retention < 60 or telemetry_agg_retention < telemetry_raw_retention:
        _fail("--telemetry-raw-retention: at least 60 s; --telemetry-agg-retention: at least the raw retention")
    if fleet_tick <= 0 or alert_group_wait < 0:
        _fail("--fleet-tick must be above 0, --alert-group-wait at least 0")
    if workers < 1 or max_requests < 1 or max_longpolls < 0 or ttl_slack < 0 or challenge_rate < 0:
        _fail("--workers and --max-requests must be at least 1, --max-longpolls, --ttl-slack and --challenge-rate "
              "at least 0")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    _check_tls(tls_cert, tls_key)
    ddir = data_dir or default_data_dir()
    settings = _settings(ddir, db, db_schema, public_url=public_url,
                         tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None, sweep_interval_s=sweep_interval,
                         heartbeat_flush_s=heartbeat_flush, token_ttl_s=token_ttl, ttl_slack_s=ttl_slack,
                         max_requests_in_flight=max_requests, max_longpolls=max_longpolls,
                         challenges_per_address_per_s=challenge_rate,
                         fleet_tick_s=fleet_tick, alert_group_wait_s=alert_group_wait,
                         telemetry_raw_retention_s=telemetry_raw_retention,
                         telemetry_agg_retention_s=telemetry_agg_retention)
    _check_database(settings)
    sntp = None
    if sntp_port is not None:
        try:
            from .server import sntp as sntp_mod  # written by the operations work; optional
        except ModuleNotFoundError:
            _fail("--sntp-port: picoiot.server.sntp is not available in this build")
        sntp = getattr(sntp_mod, "serve_sntp", None) or getattr(sntp_mod, "serve", None)
        if sntp is None:
            _fail("--sntp-port: picoiot.server.sntp has no serve_sntp()")
        settings.ntp_address = f"{host}:{sntp_port}"
    if workers == 1:
        _serve_one(settings, ddir, host, port, public_url, sntp, sntp_port)
        return
    if not settings.is_postgres:
        # every process keeps caches (versions, liveness) and wakes long-polls from change events; only PostgreSQL's
        # LISTEN/NOTIFY carries them between processes. SQLite would answer stale `pending` versions and miss wake-ups.
        _fail("--workers > 1 needs PostgreSQL (--db postgresql://…): the processes keep their caches and long-polls "
              "in step through LISTEN/NOTIFY, which SQLite does not have")
    if sntp is not None and sntp_port == 0:
        _fail("--sntp-port 0 with --workers > 1: give a fixed port (every worker advertises it)")
    _serve_workers(settings, ddir, host, port, public_url, sntp, sntp_port, workers)


def _check_tls(cert: Optional[Path], key: Optional[Path]) -> None:
    """Both or neither, and a pair the ssl module loads: a clear error now instead of a traceback from uvicorn."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        _fail("--tls-cert and --tls-key go together")
    import ssl
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except FileNotFoundError as e:
        _fail(f"TLS: {e.filename}: no such file")
    except (ssl.SSLError, OSError) as e:
        _fail(f"TLS: --tls-cert {cert} / --tls-key {key} unusable: {e}")


def _scheme(settings) -> str:
    return "https" if settings.tls_cert else "http"


def _uvicorn_server(settings, host: str, port: int):
    import uvicorn

    from .server.app import create_app

    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, loop=loop,
                            timeout_graceful_shutdown=5, server_header=False,
                            ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    srv = _QuietExitServer(config)
    srv.on_exit = app.state.cp.notifier.drain  # held long-polls answer at once: devices re-poll another replica
    return srv, loop


def _write_server_info(ddir: Path, url: str, ntp: Optional[str], workers: int = 1) -> None:
    info = ddir / SERVER_INFO
    tmp = info.with_name(info.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "ntp": ntp, "workers": workers}))
    os.replace(tmp, info)


def _serve_one(settings, ddir: Path, host: str, port: int, public_url: Optional[str], sntp, sntp_port,
               sock=None, ready_fd: Optional[int] = None) -> None:
    """One server process: on (host, port), or on an inherited listening socket (a worker: then it reports readiness
    on ready_fd instead of writing server.json, which is the supervisor's)."""
    srv, loop = _uvicorn_server(settings, host, port)

    async def main() -> None:
        transport = None
        if sntp is not None:
            # serve_sntp(host, port) binds UDP and returns the transport (picoiot.server.sntp)
            try:
                transport = await sntp(host, sntp_port)
            except OSError as e:
                _fail(f"--sntp-port {sntp_port}: {e.strerror or e}")
            bound_udp = transport.get_extra_info("sockname")[1]
            settings.ntp_address = f"{host}:{bound_udp}"  # the app reads settings live: port 0 → the real port
        serving = asyncio.create_task(srv.serve(sockets=[sock] if sock is not None else None))
        try:
            while not srv.started:
                if serving.done():
                    serving.result()
                    raise typer.Exit(1)
                await asyncio.sleep(0.02)
            if ready_fd is not None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)
            else:
                bound = srv.servers[0].sockets[0].getsockname()[1] if srv.servers else port
                url = f"{_scheme(settings)}://{host}:{bound}"
                _write_server_info(ddir, public_url or url, settings.ntp_address)
                typer.echo(f"picoiot server listening on {url}")
            await serving
        finally:
            if transport is not None:
                transport.close()

    try:
        asyncio.run(main()) if loop == "asyncio" else __import__("uvloop").run(main())
    except KeyboardInterrupt:  # pragma: no cover - uvicorn normally handles the signal itself
        pass


def _serve_workers(settings, ddir: Path, host: str, port: int, public_url: Optional[str], sntp, sntp_port,
                   workers: int) -> None:
    """A supervisor and `workers` forked server processes accepting on one listening socket (PostgreSQL only).

    The schema is migrated here, once, before the fork (workers must not race on it); each worker builds its own app,
    engine and LISTEN connection after the fork. SIGTERM/SIGINT to the supervisor stops every worker; a worker that
    dies stops the others (a service manager restarts the whole), and each worker dies with the supervisor."""
    import signal
    import socket

    from .server.app import seed_device_types
    from .server.db import Database, migrate

    try:
        database = Database(settings)
        try:
            migrate(database.engine, settings)
            database.run_sync(seed_device_types)
        finally:
            database.dispose()
    except Exception as e:
        _fail(f"database {settings.db_url.split('@')[-1]}: {type(e).__name__}: {e}")
    try:
        sock = socket.create_server((host, port), backlog=4096)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    bound = sock.getsockname()[1]
    ready_r, ready_w = os.pipe()
    children: list[int] = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # worker
            code = 0
            try:
                os.close(ready_r)
                try:
                    import ctypes
                    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
                except (OSError, AttributeError):
                    pass
                _serve_one(settings, ddir, host, bound, public_url, sntp if i == 0 else None, sntp_port,
                           sock=sock, ready_fd=ready_w)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except typer.Exit as e:
                code = e.exit_code
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_w)
    sock.close()

    stopping = False

    def stop_all(*_a) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    ready = 0
    while ready < workers:
        chunk = os.read(ready_r, 16)
        if not chunk:  # every worker closed its end: one of them died before serving
            break
        ready += len(chunk)
    os.close(ready_r)
    if ready < workers:
        stop_all()
    else:
        url = f"{_scheme(settings)}://{host}:{bound}"
        _write_server_info(ddir, public_url or url, settings.ntp_address, workers)
        typer.echo(f"picoiot server listening on {url} ({workers} worker processes)")
    failed = ready < workers
    remaining = set(children)
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        remaining.discard(pid)
        if not stopping:  # a worker died on its own: stop the rest
            failed = True
            stop_all()
        elif os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM):
            failed = True
    if failed:
        raise typer.Exit(1)


def _quiet_exit_server_class():
    import contextlib
    import signal

    import uvicorn

    class QuietExitServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown (exit status -15); a service manager should
        see a clean stop as exit 0, so we handle the signals ourselves."""

        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        on_exit = None

        def _on_signal(self, sig) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if self.on_exit is not None:
                self.on_exit()

    return QuietExitServer


def _QuietExitServer(config):  # noqa: N802 - a class factory keeps uvicorn out of the CLI's import time
    return _quiet_exit_server_class()(config)


# ------------------------------------------------------------------------------------------------ provision / token
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
    from .server.core import ControlPlane
    from .server.db import migrate
    from .server.errors import ApiError
    from .server.models import ProvisionIn
    from .server.operators import _provision

    if not NAME_RE.match(device_id) or not NAME_RE.match(namespace):
        _fail("device id and namespace: 1-64 characters of A-Z a-z 0-9 _ . -")
    if kind is not None and kind not in ("relays", "sensors"):
        _fail("--kind must be relays or sensors")
    type_ = type_ or kind
    if board_settings is not None:
        if kind is None:
            _fail("--board-settings needs --kind relays|sensors")
        if not wifi_ssid:
            _fail("--board-settings needs --wifi-ssid and --wifi-password (the network the board joins)")
        if len(wifi_password) != len(wifi_ssid):
            _fail("give one --wifi-password per --wifi-ssid ('' for an open network)")
        for i, (ssid, pw) in enumerate(zip(wifi_ssid, wifi_password)):
            if not 1 <= len(ssid) <= 32 or not (pw == "" or 8 <= len(pw) <= 64):
                _fail(f"--wifi-ssid/--wifi-password #{i + 1}: SSID 1-32 characters, password empty or 8-64")
        for r in api_token:
            if r not in ("viewer", "operator", "admin"):
                _fail("--api-token: viewer, operator or admin")
        if ca is not None and not ca.is_file():
            _fail(f"--ca {ca}: no such file")
    settings = _settings(data_dir, db, db_schema)
    if settings.secrets.enrollment_key(namespace) is None:
        if not create_namespace:
            _fail(f"unknown namespace {namespace!r}")
        settings.secrets.add_namespace(namespace)
    cp = ControlPlane(settings)
    try:
        migrate(cp.db.engine, settings)
        cp.db.run_sync(seed_device_types)
        body = ProvisionIn(device_id=device_id, device_type=type_, group=group,
                           key_mode="individual" if individual else "derived")
        def enrol(conn):
            k = _provision(conn, [], cp, namespace, body, settings.secrets.enrollment_key(namespace))
            _audit_cli(conn, namespace, "POST", f"/api/v1/namespaces/{namespace}/devices", "enrolment", device_id,
                       201, body.model_dump(mode="json"), {"device_id": device_id, "key_mode": body.key_mode})
            return k
        key = cp.db.run_sync(enrol)  # the enrolment and its audit entry in one transaction
    except ApiError as e:
        _fail(f"{e.error}")
    finally:
        cp.db.dispose()
    doc = {"device_id": device_id, "device_key": key, "namespace": namespace,
           "service_discovery_url": discovery_url or f"{settings.public_url or _server_url(data_dir)}/api/devices"}
    if board_settings is not None:
        _write_board_settings(board_settings, doc, kind, list(zip(wifi_ssid, wifi_password)), ca, ota_key, api_token,
                              _server_ntp(data_dir))
    text = json.dumps(doc, indent=1)
    if out is None:
        typer.echo(text)
    else:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(out, 0o600)
        typer.echo(f"wrote {out}")


def _server_ntp(data_dir: Optional[Path]) -> Optional[str]:
    try:
        return json.loads(((data_dir or default_data_dir()) / SERVER_INFO).read_text()).get("ntp")
    except (OSError, ValueError, AttributeError):
        return None


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
        _fail(str(e))
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
        _fail(f"role must be one of {', '.join(ROLES)}")
    if ttl <= 0:
        _fail("--ttl must be positive")
    settings = _settings(_existing_secrets(data_dir), db, db_schema)
    if device is None:
        if namespace != "*" and settings.secrets.enrollment_key(namespace) is None:
            _fail(f"unknown namespace {namespace!r}")
        _audit_offline(settings, namespace, "token", {"role": role, "namespace": namespace, "sub": sub, "ttl": ttl})
        typer.echo(issue_token(settings.secrets.signing_key, sub, namespace, role, ttl))
        return
    enrollment = settings.secrets.enrollment_key(namespace)
    if enrollment is None:
        _fail(f"unknown namespace {namespace!r}")
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
        _fail(f"--role must be one of {', '.join(ROLES)}")
    settings = Settings.from_data_dir(data_dir or default_data_dir())
    base = (url or _server_url(data_dir)).rstrip("/")
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


# ------------------------------------------------------------------------------------------------ HTTP client commands
class _Api:
    def __init__(self, url: Optional[str], tok: Optional[str], data_dir: Optional[Path], namespace: str, role: str):
        import httpx

        from .server.auth import issue_token
        self.ns = namespace
        base = (url or _server_url(data_dir)).rstrip("/")
        if not tok:
            from .server.settings import SECRETS_FILE
            if not ((data_dir or default_data_dir()) / SECRETS_FILE).exists():
                _fail("no token: pass --token or set PICOIOT_TOKEN (`source .picoiot-demo/demo.env` sets it for the "
                      "demo), or --data-dir of the server to mint one")
            settings = Settings.from_data_dir(data_dir or default_data_dir())
            tok = issue_token(settings.secrets.signing_key, "cli", namespace, role, 300)
        # the User-Agent marks the audit log entries of writes made with the CLI (via "cli")
        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tok}",
                                                          "User-Agent": "picoiot-cli"}, timeout=30)

    def call(self, method: str, path: str, **kw) -> Any:
        import httpx
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            _fail(f"cannot reach the server at {self.client.base_url}: {type(e).__name__}")
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"error": r.text}
            hint = (f" — {self.client.base_url} did not accept the token: use one it issued (--token / "
                    "PICOIOT_TOKEN, or --data-dir of that server)") if r.status_code == 401 else ""
            _fail(f"{r.status_code} {body.get('error')}" + (f" {json.dumps(body['detail'])}" if body.get("detail")
                                                               else "") + hint)
        return r.json() if r.content else None


Url = typer.Option(None, "--url", envvar="PICOIOT_URL", help="server URL [default: from the data dir, or :8080]")
Tok = typer.Option(None, "--token", envvar="PICOIOT_TOKEN", help="bearer token [default: minted from the data dir]")
Ns = typer.Option("default", "--namespace", "-n")


def _print_json(obj: Any) -> None:
    from rich.console import Console
    Console().print_json(json.dumps(obj))


def _parse_assignments(pairs: list[str]) -> dict:
    """`a.b=5 c=on d=null` → {"a": {"b": 5}, "c": "on", "d": None}: values are JSON if they parse, else strings."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            _fail(f"expected KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                _fail(f"{key}: conflicts with another assignment")
        node[parts[-1]] = value
    return out


def _ago(ts: Optional[int]) -> str:
    import time
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts / 1000))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


devices_app = typer.Typer(help="List, inspect, regroup and delete devices (over HTTP).", no_args_is_help=True)
config_app = typer.Typer(help="Show and change device and group config (over HTTP).", no_args_is_help=True)
state_app = typer.Typer(help="Show shadows and set desired state (over HTTP).", no_args_is_help=True)
alarms_app = typer.Typer(help="List and acknowledge alarms (over HTTP).", no_args_is_help=True)


@devices_app.command("list")
def devices_list(namespace: str = Ns, online: Optional[bool] = typer.Option(None, "--online/--offline"),
                 as_json: bool = typer.Option(False, "--json"), url: Optional[str] = Url,
                 tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """Devices of a namespace."""
    from rich.console import Console
    from rich.table import Table
    api = _Api(url, tok, data_dir, namespace, "viewer")
    params = {} if online is None else {"online": str(online).lower()}
    devs = api.call("GET", f"/api/v1/namespaces/{namespace}/devices", params=params)["devices"]
    if as_json:
        _print_json(devs)
        return
    t = Table("device", "type", "group", "online", "last seen", "firmware", "config v", "address")
    for d in devs:
        t.add_row(d["device_id"], d["device_type"] or "-", d["group"] or "-",
                  "[green]yes[/]" if d["online"] else "[red]no[/]", _ago(d["last_seen"]), d["firmware"] or "-",
                  str(d["config_version"]), d["address"] or "-")
    Console().print(t)


@devices_app.command("show")
def devices_show(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                 data_dir: Optional[Path] = DataDir) -> None:
    """One device record."""
    _print_json(_Api(url, tok, data_dir, namespace, "viewer").call("GET", f"/api/v1/namespaces/{namespace}/devices/"
                                                                          f"{device_id}"))


@devices_app.command("group")
def devices_group(device_id: str, group: str = typer.Argument(..., help="group name, or '-' for none"),
                  namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                  data_dir: Optional[Path] = DataDir) -> None:
    """Move a device to a config group."""
    api = _Api(url, tok, data_dir, namespace, "admin")
    d = api.call("PATCH", f"/api/v1/namespaces/{namespace}/devices/{device_id}",
                 json={"group": None if group == "-" else group})
    typer.echo(f"{device_id}: group {d['group'] or '-'}, config v{d['config_version']}")


@devices_app.command("delete")
def devices_delete(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                   data_dir: Optional[Path] = DataDir) -> None:
    """Forget a device (record, config history, shadows, alarms)."""
    _Api(url, tok, data_dir, namespace, "admin").call("DELETE", f"/api/v1/namespaces/{namespace}/devices/{device_id}")
    typer.echo(f"deleted {device_id}")


@config_app.command("show")
def config_show(device_id: str, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                data_dir: Optional[Path] = DataDir) -> None:
    """Effective config, overrides and the device's last report."""
    _print_json(_Api(url, tok, data_dir, namespace, "viewer").call(
        "GET", f"/api/v1/namespaces/{namespace}/devices/{device_id}/config"))


@config_app.command("set")
def config_set(device_id: str, assignments: list[str] = typer.Argument(..., help="KEY.PATH=VALUE (VALUE as JSON; "
                                                                                   "null removes)"),
               namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
               data_dir: Optional[Path] = DataDir) -> None:
    """Merge into a device's config overrides, e.g. `sampling.interval_ms=500`."""
    out = _Api(url, tok, data_dir, namespace, "admin").call(
        "PATCH", f"/api/v1/namespaces/{namespace}/devices/{device_id}/config",
        json={"overrides": _parse_assignments(assignments)})
    typer.echo(f"{device_id}: config v{out['version']}")


@config_app.command("group")
def config_group(name: str, assignments: list[str] = typer.Argument(None, help="KEY.PATH=VALUE (replaces the "
                                                                                 "group's overrides)"),
                 namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
                 data_dir: Optional[Path] = DataDir) -> None:
    """Create or replace a group's overrides."""
    out = _Api(url, tok, data_dir, namespace, "admin").call(
        "PUT", f"/api/v1/namespaces/{namespace}/groups/{name}",
        json={"overrides": _parse_assignments(assignments or [])})
    typer.echo(f"group {out['name']}: {json.dumps(out['overrides'])}")


@state_app.command("show")
def state_show(device_id: str, shadow: str = typer.Option("default"), namespace: str = Ns,
               url: Optional[str] = Url, tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """A shadow document (desired, reported, delta, version)."""
    _print_json(_Api(url, tok, data_dir, namespace, "viewer").call(
        "GET", f"/api/v1/namespaces/{namespace}/devices/{device_id}/shadows/{shadow}"))


@state_app.command("set")
def state_set(device_id: str, assignments: list[str] = typer.Argument(..., help="KEY=VALUE, e.g. relay1=on"),
              shadow: str = typer.Option("default"), version: Optional[int] = typer.Option(
                  None, help="apply only if the shadow is still at this version"),
              namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
              data_dir: Optional[Path] = DataDir) -> None:
    """Set desired state (the device applies it and reports back), e.g. `state set relay-1 relay1=on`."""
    body: dict[str, Any] = {"state": {"desired": _parse_assignments(assignments)}}
    if version is not None:
        body["version"] = version
    doc = _Api(url, tok, data_dir, namespace, "operator").call(
        "POST", f"/api/v1/namespaces/{namespace}/devices/{device_id}/shadows/{shadow}", json=body)
    typer.echo(f"{device_id}/{shadow}: v{doc['version']} delta {json.dumps(doc['state']['delta'])}")


@alarms_app.command("list")
def alarms_list(namespace: str = Ns, state: Optional[str] = typer.Option(None, help="firing | resolved"),
                device: Optional[str] = None, severity: Optional[str] = None,
                unacked: bool = typer.Option(False, help="only alarms not acknowledged"),
                as_json: bool = typer.Option(False, "--json"), url: Optional[str] = Url,
                tok: Optional[str] = Tok, data_dir: Optional[Path] = DataDir) -> None:
    """Alarms, newest first."""
    from rich.console import Console
    from rich.table import Table
    params: dict[str, Any] = {k: v for k, v in (("state", state), ("device", device), ("severity", severity)) if v}
    if unacked:
        params["acked"] = "false"
    rows = _Api(url, tok, data_dir, namespace, "viewer").call("GET", f"/api/v1/namespaces/{namespace}/alarms",
                                                              params=params)["alarms"]
    if as_json:
        _print_json(rows)
        return
    colour = {"critical": "red", "error": "red", "warning": "yellow", "info": "blue"}
    t = Table("id", "device", "key", "severity", "state", "count", "last", "acked", "message")
    for a in rows:
        t.add_row(str(a["id"]), a["device_id"], a["key"], f"[{colour.get(a['severity'], 'white')}]{a['severity']}[/]",
                  a["state"], str(a["count"]), _ago(a["last_ts"]), a["acked_by"] or "-", a["message"])
    Console().print(t)


@alarms_app.command("ack")
def alarms_ack(alarm_id: int, namespace: str = Ns, url: Optional[str] = Url, tok: Optional[str] = Tok,
               data_dir: Optional[Path] = DataDir) -> None:
    """Acknowledge an alarm."""
    a = _Api(url, tok, data_dir, namespace, "operator").call("POST",
                                                             f"/api/v1/namespaces/{namespace}/alarms/{alarm_id}/ack")
    typer.echo(f"alarm {a['id']} ({a['device_id']}/{a['key']}) acknowledged by {a['acked_by']}")


def register(app: typer.Typer) -> None:
    app.command("server")(server)
    app.command("provision")(provision)
    app.command("token")(token)
    app.command("ui-link")(ui_link)
    app.add_typer(devices_app, name="devices")
    app.add_typer(config_app, name="config")
    app.add_typer(state_app, name="state")
    app.add_typer(alarms_app, name="alarms")
