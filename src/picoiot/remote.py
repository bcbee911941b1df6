"""The control plane's HTTP client, shared by every remote command (`devices`, `config`, `state`, `alarms`, `ota`).

One client and one error path: the server unreachable, or an answer of 400 or above, is a `RemoteError` whose message
is the line the CLI prints. The commands never look at a status code themselves. Writes are marked in the audit log
as made with the CLI (`via: cli`) by the User-Agent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .cliopts import CliError, server_url
from .server.settings import SECRETS_FILE, Settings, default_data_dir

USER_AGENT = "picoiot-cli"
MINTED_TOKEN_TTL_S = 300  # a token minted for one command: long enough for an upload, useless soon after


class RemoteError(CliError):
    """A call to the control plane failed: unreachable, or answered with an error (`status` is then set)."""

    def __init__(self, msg: str, status: Optional[int] = None):
        super().__init__(msg)
        self.status = status


class Remote:
    """A session with one control plane, as one bearer token."""

    def __init__(self, url: str, token: str, timeout: float = 30):
        self.base_url = url.rstrip("/")
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}

    def call(self, method: str, path: str, what: str = "", **kw) -> Any:
        """The decoded JSON answer (None if empty); `what` names the step in a refusal of a multi-step command.
        A connection per call, closed with it: a command makes a few calls, and most callers never close a Remote."""
        import httpx
        try:
            with httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers) as http:
                r = http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the server at {self.base_url}: {type(e).__name__}") from None
        if r.status_code >= 400:
            raise RemoteError((f"{what}: " if what else "") + _describe(r, self.base_url), r.status_code)
        return r.json() if r.content else None

    def close(self) -> None:
        """Nothing stays open between calls; kept so `with Remote(...)` reads as a session."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(r, base_url: str) -> str:
    try:
        body = r.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": r.text[:200]}
    detail = f" {json.dumps(body['detail'])}" if body.get("detail") else ""
    hint = (f" — {base_url} did not accept the token: use one it issued (--token / PICOIOT_TOKEN, or --data-dir of "
            "that server)") if r.status_code == 401 else ""
    return f"{r.status_code} {body.get('error')}{detail}{hint}"


def resolve(url: Optional[str], token: Optional[str], data_dir: Optional[Path], namespace: str,
            role: str) -> tuple[str, str]:
    """(base URL, token) for a remote command: as given, else from the data directory of the server (its
    server.json, and a token minted with its signing key for `role` in `namespace`)."""
    base = (url or server_url(data_dir)).rstrip("/")
    if token:
        return base, token
    ddir = data_dir or default_data_dir()
    if not (ddir / SECRETS_FILE).exists():  # minting from a secret made up here would give a token no server accepts
        raise RemoteError("no token: pass --token or set PICOIOT_TOKEN (`source .picoiot-demo/demo.env` sets it for "
                          "the demo), or --data-dir of the server to mint one")
    from .server.auth import issue_token
    return base, issue_token(Settings.from_data_dir(ddir).secrets.signing_key, "cli", namespace, role,
                             MINTED_TOKEN_TTL_S)


def connect(url: Optional[str], token: Optional[str], data_dir: Optional[Path], namespace: str, role: str) -> Remote:
    return Remote(*resolve(url, token, data_dir, namespace, role))
