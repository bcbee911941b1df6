"""Helpers for the control-plane tests: a real uvicorn serving the control plane on 127.0.0.1 (in a thread), on SQLite and on PostgreSQL.

Every test gets its own database: a fresh SQLite file, or a fresh PostgreSQL schema (unique per process and test,
dropped afterwards), so concurrent runs on one PostgreSQL never see each other's rows or notifications.
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from picoiot.server import Settings, create_app
from picoiot.server.auth import derive_device_key, issue_token
from picoiot.server.settings import SecretStore

PG_URL = os.environ.get("PICOIOT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_counter = itertools.count()
_pg_ok: bool | None = None


def pg_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            with socket.create_connection(("127.0.0.1", 5432), timeout=1):
                pass
            eng = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
            with eng.connect() as c:
                c.exec_driver_sql("SELECT 1")
            eng.dispose()
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


def new_schema() -> str:
    return f"cp_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


def drop_schema(schema: str) -> None:
    eng = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with eng.begin() as c:
        c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    eng.dispose()


def require_pg() -> None:
    if not pg_available():
        if os.environ.get("PICOIOT_REQUIRE_ALL"):
            pytest.fail(f"PostgreSQL not reachable at {PG_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")


@dataclass
class Device:
    device_id: str
    namespace: str
    key: str
    token: str
    services: dict
    intervals: dict

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


class LiveServer:
    """The app under uvicorn in a thread, on a free port; `client` is an httpx.Client on its base URL."""

    def __init__(self, settings: Settings, app=None):
        import uvicorn
        self.settings = settings
        self.app = app if app is not None else create_app(settings)
        self.cp = self.app.state.cp
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=20)

    def stop(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(10)

    # --- helpers ---
    def token(self, role: str = "admin", ns: str = "default", sub: str = "tester", ttl: int = 300) -> str:
        return issue_token(self.settings.secrets.signing_key, sub, ns, role, ttl)

    def auth(self, role: str = "admin", ns: str = "default") -> dict:
        return {"Authorization": f"Bearer {self.token(role, ns)}"}

    def sql(self, fn):
        return self.cp.db.run_sync(fn)

    def register(self, device_id: str, device_type: str | None = "relays", ns: str = "default",
                 key: str | None = None, **extra) -> Device:
        key = key or derive_device_key(self.settings.secrets.enrollment_key(ns), device_id)
        c = self.client
        r = c.post("/api/devices/challenge", json={"device_id": device_id, "namespace": ns})
        assert r.status_code == 200, r.text
        nonce = r.json()["nonce"]
        body = {"device_id": device_id, "nonce": nonce, "signature": sign(key, nonce, device_id),
                "firmware": "0.1.0", "capabilities": ["rest"], "address": "http://10.0.0.9:80", **extra}
        if device_type:
            body["device_type"] = device_type
        r = c.post("/api/devices/register", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        return Device(device_id, out["namespace"], key, out["token"], out["services"], out["intervals"])


def sign(key: str, nonce: str, device_id: str) -> str:
    return hmac.new(key.encode(), f"{nonce}|{device_id}".encode(), hashlib.sha256).hexdigest()


def make_settings(backend: str, tmp_path: Path, schema: str | None = None, **kw) -> Settings:
    secrets = SecretStore(tmp_path / "secrets.json")
    secrets.add_namespace("other")
    kw.setdefault("sweep_interval_s", 0.1)
    if backend == "sqlite":
        db = tmp_path / "cp.db"
        if not db.exists():
            shutil.copyfile(_migrated_sqlite(), db)
        return Settings(db_url=f"sqlite:///{db}", secrets=secrets, data_dir=tmp_path, **kw)
    return Settings(db_url=PG_URL, db_schema=schema, secrets=secrets, data_dir=tmp_path, **kw)


_template: list[Path] = []


def _migrated_sqlite() -> Path:
    """A SQLite database migrated once per test process. Each SQLite test starts from a copy of it: what the app's
    start-up migration would make of an empty file, without paying the ~0.2 s of DDL per test (the server still runs
    its migrate(), which finds every version applied). The migrations themselves run here, on an empty file."""
    if not _template:
        from picoiot.server.db import Database, migrate
        where = Path(tempfile.mkdtemp(prefix="picoiot-cp-template-"))
        atexit.register(shutil.rmtree, where, True)
        settings = Settings(db_url=f"sqlite:///{where / 'cp.db'}", secrets=SecretStore(where / "secrets.json"),
                            data_dir=where)
        db = Database(settings)
        try:
            migrate(db.engine, settings)
        finally:
            db.dispose()  # the last connection's close checkpoints the WAL into the file
        _template.append(where / "cp.db")
    return _template[0]




def metric(client: httpx.Client, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (labels as rendered, e.g. 'kind="heartbeat"'); 0.0 when absent."""
    key = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(key):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(pred, timeout: float = 15.0, step: float = 0.01) -> None:
    """Poll a condition (a synchronisation aid, not a timing assertion); fails the test if it never holds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(step)
