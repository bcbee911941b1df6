"""`picoiot server`: the control plane as a service — one uvicorn process, or a supervisor and forked workers on one
listening socket (PostgreSQL), with the SNTP responder beside it.

It checks what it can before serving (TLS pair, database reachable, option ranges) so a mistake is one line, writes
`server.json` in the data directory once it listens (where the other commands find it), and exits 0 on SIGTERM/SIGINT
after a graceful shutdown.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Optional

import typer

from .cliopts import SERVER_INFO, DataDir, DbSchema, DbUrl
from .cliopts import fail as _fail
from .cliopts import settings_for as _settings
from .server.settings import Settings, default_data_dir


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
           max_registrations: int = typer.Option(Settings.max_registrations_in_flight,
                                                 help="registrations (challenge, register) worked on at once per "
                                                      "process; beyond: 503 + Retry-After, the device retries "
                                                      "(0 = refuse every registration)"),
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
    if (workers < 1 or max_requests < 1 or max_longpolls < 0 or max_registrations < 0 or ttl_slack < 0
            or challenge_rate < 0):
        _fail("--workers and --max-requests must be at least 1, --max-longpolls, --max-registrations, --ttl-slack "
              "and --challenge-rate at least 0")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    _check_tls(tls_cert, tls_key)
    ddir = data_dir or default_data_dir()
    settings = _settings(ddir, db, db_schema, public_url=public_url,
                         tls_cert=str(tls_cert) if tls_cert else None, tls_key=str(tls_key) if tls_key else None, sweep_interval_s=sweep_interval,
                         heartbeat_flush_s=heartbeat_flush, token_ttl_s=token_ttl, ttl_slack_s=ttl_slack,
                         max_requests_in_flight=max_requests, max_longpolls=max_longpolls,
                         max_registrations_in_flight=max_registrations,
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


def register(app: typer.Typer) -> None:
    app.command("server")(server)
