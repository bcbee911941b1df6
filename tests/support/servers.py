"""`picoiot server` (the real CLI) as a subprocess, on `picoiot.procs.ServerChild`: the process `picoiot demo` and
`picoiot sim` run, here with an admin's client, fast timers and a choice of database.

Its ports are fixed when it is made, so it can be stopped and started again on the same address with the same data
directory, the way an operator restarts the control plane. It runs in its own process group and gets SIGTERM if the
test process dies (procs.Child), so a killed run leaves no server behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from picoiot.procs import ServerChild
from picoiot.server.auth import issue_token
from picoiot.server.settings import Settings

#: Timers short enough that a test sees a sweep (liveness, alarms) and a heartbeat flush within a fraction of a second.
FAST = ("--sweep-interval", "0.2", "--heartbeat-flush", "0.2")


class ServerProcess(ServerChild):
    """db/db_schema: PostgreSQL (support.pg) instead of the data directory's SQLite; sntp: also answer SNTP (and
    advertise it to devices); fast: FAST timers; secrets_from: a data directory whose secrets (signing and enrollment
    keys) this server shares, so tokens and keys work on both; client_timeout: of `client` (a test that holds
    long-polls waits longer)."""

    def __init__(self, data_dir: Path, db: str | None = None, db_schema: str | None = None, sntp: bool = False,
                 extra: tuple[str, ...] = (), fast: bool = True, secrets_from: Path | None = None,
                 log: Path | None = None, client_timeout: float = 20):
        schema = ("--db-schema", db_schema) if db_schema else ()
        self.db_args = (["--db", db] if db else []) + list(schema)  # for the other commands on its database
        super().__init__(data_dir, db=db, extra=(*(FAST if fast else ()), *schema, *extra), log=log)
        self.sntp = sntp
        if not sntp:
            self.sntp_port = None
        if secrets_from is not None:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copy2(Path(secrets_from) / "secrets.json", data_dir / "secrets.json")
        self._client_timeout = client_timeout
        self.client = httpx.Client(base_url=self.url, timeout=client_timeout)
        self.settings: Settings | None = None

    def argv(self) -> list[str]:
        a = super().argv()
        if not self.sntp:  # ServerChild always answers SNTP; without it the devices are told of no time server
            i = a.index("--sntp-port")
            del a[i:i + 2]
        return a

    def start(self, timeout_s: float = 30) -> "ServerProcess":
        super().start(timeout_s)
        self.settings = Settings.from_data_dir(self.data_dir)
        return self

    @property
    def secrets(self):
        return self.settings.secrets

    def stop(self, *args, **kw):
        rc = super().stop(*args, **kw)
        # the client's pooled connections went to the stopped process: close them here (a socket the GC finds later
        # fails whichever test is running then), and start again with a client that has none
        self.client.close()
        self.client = httpx.Client(base_url=self.url, timeout=self._client_timeout)
        return rc

    def close(self) -> None:
        self.stop()
        self.client.close()

    def token(self, role: str = "admin", ns: str = "default", sub: str = "tester", ttl: int = 300) -> str:
        return issue_token(self.settings.secrets.signing_key, sub, ns, role, ttl)

    def metric(self, name: str, labels: str = "", **by_label) -> float:
        from .waits import metric
        return metric(self.client, name, labels, **by_label)
