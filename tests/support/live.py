"""The control plane under a real uvicorn in the test's own process, on 127.0.0.1 (a thread), on SQLite or
PostgreSQL; and a device's registration against it.

Every server gets its own database: a fresh SQLite file (a copy of one migrated per process), or a PostgreSQL schema
(support.pg)."""
from __future__ import annotations

import atexit
import hashlib
import hmac
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from picoiot.server import Settings, create_app
from picoiot.server.auth import derive_device_key, issue_token
from picoiot.server.settings import SecretStore

from .pg import PG_URL


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
