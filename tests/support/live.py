"""The control plane in the test's own process, on SQLite or PostgreSQL, and a device's registration against it:
- `InProcessServer`: the app driven through ASGI, no socket: its lifespan (migration, LISTEN, sweepers) runs on an
  event loop in a thread, and `client` is an httpx.Client whose transport calls the app on that loop;
- `LiveServer`: the same app under a real uvicorn on 127.0.0.1 (a thread), for what needs a socket: other processes
  or clients of their own reaching its URL, streamed answers, a connection's own behaviour.

Both have one interface (`url`, `client`, `cp`, `settings`, `stop`, `token`, `auth`, `sql`, `register`). Every
server gets its own database: a fresh SQLite file (a copy of one migrated per process), or a PostgreSQL schema
(support.pg)."""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
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


class _Served:
    """What a test does with a started control plane, however it is reached: `client` talks to it."""

    url: str
    client: httpx.Client

    def __init__(self, settings: Settings, app=None):
        self.settings = settings
        self.app = app if app is not None else create_app(settings)
        self.cp = self.app.state.cp

    def stop(self) -> None:
        raise NotImplementedError

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


class LiveServer(_Served):
    """The app under uvicorn in a thread, on a free port; `client` is an httpx.Client on its base URL."""

    def __init__(self, settings: Settings, app=None):
        import uvicorn
        super().__init__(settings, app)
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


class InProcessServer(_Served):
    """The app with no socket: its lifespan runs on an event loop in a thread, as under uvicorn, and `client` hands
    each request to the app on that loop (httpx.ASGITransport). Requests from several threads run concurrently, so a
    long-poll held in one thread is answered by a write from another. An exception in the app is a 500, as a server
    answers; the client's read timeout bounds every request. Answers are whole, not streamed. `url` names no socket:
    it is the base URL the app sees, so the URLs it advertises start with it."""

    url = "http://127.0.0.1:9"  # port 9 (discard): anything that tries to connect to it is refused at once

    def __init__(self, settings: Settings, app=None):
        super().__init__(settings, app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._to_app: asyncio.Queue = asyncio.Queue()  # bound to the loop that first waits on it: the server's
        self._from_app: asyncio.Queue = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan = asyncio.run_coroutine_threadsafe(self.app(scope, self._to_app.get, self._from_app.put),
                                                          self._loop)
        try:
            self._lifespan_step("startup")
        except BaseException:
            self._end_loop()
            raise
        self.client = httpx.Client(base_url=self.url, timeout=20,
                                   transport=_LoopTransport(self.app, self._loop))

    def _call(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _lifespan_step(self, step: str) -> None:
        self._call(self._to_app.put({"type": f"lifespan.{step}"}))
        answer = self._call(self._from_app.get())
        if answer["type"] != f"lifespan.{step}.complete":
            raise RuntimeError(f"lifespan {step}: {answer}")

    def stop(self) -> None:
        self.client.close()
        if not self._thread.is_alive():
            return
        try:
            self._lifespan_step("shutdown")
            self._lifespan.result(10)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._call(_cancel_all(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _cancel_all() -> None:
    """Whatever the test left running on the loop (a long-poll it never waited for) ends with the server."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class _LoopTransport(httpx.BaseTransport):
    """A synchronous httpx transport that runs each request through the ASGI app on the server's loop."""

    def __init__(self, app, loop: asyncio.AbstractEventLoop):
        self._asgi = httpx.ASGITransport(app, raise_app_exceptions=False)
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        future = asyncio.run_coroutine_threadsafe(self._send(request, body), self._loop)
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise httpx.ReadTimeout("no answer within the client's timeout", request=request) from None

    async def _send(self, request: httpx.Request, body: bytes) -> httpx.Response:
        sent = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        answer = await self._asgi.handle_async_request(sent)
        raw = b"".join([chunk async for chunk in answer.stream])  # as sent: the client decodes any content-encoding
        return httpx.Response(answer.status_code, headers=answer.headers, content=raw)


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
