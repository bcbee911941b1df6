"""What the `picoiot` commands share: their options, where a running server is found, and the one-line failure.

Two families of options:
- the data directory's (`--data-dir`, `--db`, `--db-schema`): `server`, `provision`, `token` work on the secrets and the
  database directly;
- the remote commands' (`--url`, `--token`, `--namespace`): `devices`, `config`, `state`, `alarms`, `ota` talk HTTP to
  a running server through `picoiot.remote`. They take `--data-dir` too: it tells them where the server listens and
  lets them mint a short-lived token when none is given.

Every failure a command reports is one line, `error: …`, and exit status 2: `fail()` for what the command checks
itself, `CliError` for what a helper raises (the root command turns it into the same line, see `picoiot.cli`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn, Optional

import typer

from .server.settings import Settings, default_data_dir

SERVER_INFO = "server.json"  # written by `picoiot server`: where it listens, so the other commands find it
DEFAULT_URL = "http://127.0.0.1:8080"

DataDir = typer.Option(None, "--data-dir", envvar="PICOIOT_DATA_DIR",
                       help="secrets + default SQLite database [default: ./.picoiot]")
DbUrl = typer.Option(None, "--db", envvar="PICOIOT_DB", help="database URL (sqlite:///… or postgresql://…)")
DbSchema = typer.Option(None, "--db-schema", envvar="PICOIOT_DB_SCHEMA", help="PostgreSQL schema to use")

Url = typer.Option(None, "--url", "--server", envvar="PICOIOT_URL",
                   help=f"control plane URL (default: the one in --data-dir's {SERVER_INFO}, else {DEFAULT_URL}; "
                        "--server: the old spelling)")
Token = typer.Option(None, "--token", envvar="PICOIOT_TOKEN",
                     help="bearer token (default: one minted for the call with --data-dir's signing key)")
Namespace = typer.Option("default", "--namespace", "-n")


class CliError(Exception):
    """A command failed for a reason its message says in one line (printed as `error: …`, exit status 2)."""


def fail(msg: str) -> NoReturn:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def settings_for(data_dir: Optional[Path], db: Optional[str], db_schema: Optional[str] = None, **kw) -> Settings:
    return Settings.from_data_dir(data_dir or default_data_dir(), db_url=db, db_schema=db_schema, **kw)


def server_info(data_dir: Optional[Path]) -> dict:
    """What the last `picoiot server` on this data directory wrote about itself ({} if nothing readable)."""
    try:
        info = json.loads(((data_dir or default_data_dir()) / SERVER_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def server_url(data_dir: Optional[Path]) -> str:
    return server_info(data_dir).get("url") or DEFAULT_URL
