"""Server settings and the secrets file (signing key, one enrollment key per namespace)."""
from __future__ import annotations

import json
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

SECRETS_FILE = "secrets.json"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # device ids and namespace names (protocol §1)


def default_data_dir() -> Path:
    return Path(os.environ.get("PICOIOT_DATA_DIR") or ".picoiot")


def normalise_db_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (the driver we ship), not SQLAlchemy's default psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class SecretStore:
    """The signing key and the namespaces' enrollment keys, in one 0600 JSON file (or only in memory).

    Namespaces exist exactly when they have an enrollment key. The file is re-read when it changed on disk, so
    `picoiot provision --namespace NEW` is seen by a running server without a restart.
    """

    def __init__(self, path: Path | None = None, signing_key: str | None = None,
                 enrollment_keys: dict[str, str] | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._mtime = None
        self.signing_key = signing_key or ""
        self.enrollment_keys: dict[str, str] = dict(enrollment_keys or {})
        if path is not None:
            self._load_or_create()
        if not self.signing_key:
            self.signing_key = secrets.token_hex(32)
        if not self.enrollment_keys:
            self.enrollment_keys["default"] = secrets.token_hex(32)

    @classmethod
    def in_dir(cls, data_dir: Path) -> "SecretStore":
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # also holds the database (individual device keys)
        return cls(data_dir / SECRETS_FILE)

    def _load_or_create(self) -> None:
        assert self.path is not None
        if self.path.exists():
            self._read()
            return
        self.signing_key = self.signing_key or secrets.token_hex(32)
        self.enrollment_keys = self.enrollment_keys or {"default": secrets.token_hex(32)}
        self._write()

    def _read(self) -> None:
        assert self.path is not None
        st = self.path.stat()
        data = json.loads(self.path.read_text())
        self.signing_key = data["signing_key"]
        self.enrollment_keys = dict(data.get("enrollment_keys", {}))
        self._mtime = st.st_mtime_ns

    def _write(self) -> None:
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"signing_key": self.signing_key, "enrollment_keys": self.enrollment_keys}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self._mtime = self.path.stat().st_mtime_ns

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            if self.path.stat().st_mtime_ns != self._mtime:
                self._read()
        except (OSError, ValueError, KeyError):
            pass  # keep what we have; a half-edited file must not take the server down

    def enrollment_key(self, namespace: str) -> str | None:
        with self._lock:
            key = self.enrollment_keys.get(namespace)
            if key is None:
                self._refresh()
                key = self.enrollment_keys.get(namespace)
            return key

    def namespaces(self) -> list[str]:
        with self._lock:
            self._refresh()
            return sorted(self.enrollment_keys)

    def add_namespace(self, namespace: str) -> bool:
        """Create the namespace's enrollment key; False if it already existed."""
        if not NAME_RE.match(namespace):
            raise ValueError(f"bad namespace name {namespace!r}")
        with self._lock:
            self._refresh()
            if namespace in self.enrollment_keys:
                return False
            self.enrollment_keys[namespace] = secrets.token_hex(32)
            if self.path is not None:
                self._write()
            return True


@dataclass
class Settings:
    db_url: str = "sqlite:///.picoiot/picoiot.db"
    #: PostgreSQL only: a schema of our own (created if missing) — lets test runs share one database without colliding.
    db_schema: str | None = None
    data_dir: Path | None = None
    secrets: SecretStore = field(default_factory=SecretStore)
    #: base URL put into service URLs; None = taken from each request
    public_url: str | None = None
    #: `host:port` of the SNTP responder advertised as services.ntp (None = not advertised)
    ntp_address: str | None = None
    #: PEM certificate chain and private key: serve HTTPS (`picoiot server --tls-cert/--tls-key`); None = HTTP
    tls_cert: str | None = None
    tls_key: str | None = None
    token_ttl_s: int = 3600
    nonce_ttl_s: int = 60
    #: registration challenges per client address: a burst, then this many per second (0 = no limit); beyond, 429
    challenges_per_address_per_s: float = 5.0
    challenges_per_address_burst: int = 100
    default_heartbeat_s: int = 10
    #: a device's TTL = its heartbeat interval × ttl_missed + ttl_slack_s (10 s → 35 s)
    ttl_missed: int = 3
    ttl_slack_s: int = 5
    config_poll_s: int = 60
    time_sync_s: int = 3600
    #: housekeeping period: liveness flush, offline sweep, nonce expiry, gauges
    sweep_interval_s: float = 1.0
    #: heartbeats update last_seen in memory and are written in batches this often; 0 = write every heartbeat
    heartbeat_flush_s: float = 1.0
    max_config_wait_s: int = 300
    max_state_wait_s: int = 300
    max_heartbeat_wait_s: int = 60
    max_body_bytes: int = 64 * 1024
    max_doc_bytes: int = 8 * 1024
    max_doc_depth: int = 6
    #: admission control (server/admission.py): requests doing work at once, beyond which 503 + Retry-After.
    #: By Little's law a 2,000/s heartbeat load holds rate × latency requests: 128 turned every 64 ms scheduling
    #: hiccup on a shared 2-core box into 503s; 512 is ~0.2 s of heartbeat work, far below a device's timeout, while
    #: the database queue (max_db_queue) still bounds the expensive requests.
    max_requests_in_flight: int = 512
    #: long-polls (`wait=` > 0) waiting at once, counted apart from requests (they hold no thread and little CPU);
    #: each holds a connection, so a process also needs that many file descriptors (`ulimit -n`)
    max_longpolls: int = 10_000
    #: registration calls (challenge, register) at once, beyond which 503 + Retry-After (admission.py): 64 keeps the
    #: 24 database threads busy, and a queue of ~1 s of registrations at worst on a loaded 2-core box
    max_registrations_in_flight: int = 64
    #: the per-device caches (tokens, versions) grown by this many entries (or 10 %) since start-up: move them out of
    #: the collector's sight again (app.refreeze_if_grown); 0 = only at start-up
    gc_refreeze_entries: int = 1000
    #: database calls waiting for a worker thread, beyond which 503 (DatabaseBusy)
    max_db_queue: int = 256
    #: "auto" = PostgreSQL LISTEN/NOTIFY on PostgreSQL, in-process otherwise
    notifier: str = "auto"
    #: fleet operations (server/fleet.py): how often rollouts are evaluated and alert rules checked
    fleet_tick_s: float = 1.0
    #: alert notifications: a new notification waits this long for more alerts to join it (one per receiver)
    alert_group_wait_s: float = 2.0
    #: firing alerts are re-sent to Alertmanager this often (it resolves an alert not re-sent within its timeout)
    alert_resend_s: float = 60.0
    #: a notification's delivery is retried with exponential backoff (first wait, cap) for at most this long
    alert_retry_first_s: float = 1.0
    alert_retry_max_s: float = 60.0
    alert_give_up_s: float = 3600.0
    #: one delivery attempt's timeout: a slow receiver delays only the delivery task
    alert_timeout_s: float = 5.0
    # --- telemetry history (server/telemetry.py, docs/control-plane.md § Telemetry)
    #: raw readings are kept this long, 1-minute aggregates (min/max/mean) this long
    telemetry_raw_retention_s: int = 24 * 3600
    telemetry_agg_retention_s: int = 30 * 24 * 3600
    #: buffered readings are written this often (one INSERT per flush, not per request)
    telemetry_flush_s: float = 1.0
    #: readings and aggregates past their retention are deleted this often
    telemetry_expire_s: float = 60.0
    #: per device: readings/s sustained and burst (token bucket); beyond it 429 (heartbeat readings: dropped, counted)
    telemetry_rate: float = 200.0
    telemetry_burst: int = 2000
    #: readings held in memory waiting for the flush, beyond which 503 (the database is behind): a few seconds at the
    #: 20,000 readings/s target, so a database that falls behind pushes back instead of filling the heap
    telemetry_max_buffer: int = 100_000
    #: distinct field names per device (per server process), beyond which a new name is refused ("too_many_fields")
    telemetry_max_fields: int = 64
    #: a reading stamped later than now + this is "from the future" and refused
    telemetry_max_skew_s: int = 120
    #: Prometheus series of the latest values (one per namespace/device/field) at most; more are counted, not shown
    telemetry_gauge_series: int = 1000
    # --- dashboard (server/ui/)
    #: a dashboard session lasts this long at most (never beyond the token it was opened with)
    ui_session_s: int = 8 * 3600
    #: Server-Sent Events: a `tick` this often (the fleet page re-reads heartbeat figures on it)
    ui_tick_s: float = 5.0
    #: one event stream lasts this long, then the browser reconnects (lets a server stop without waiting on it)
    ui_stream_s: float = 60.0

    def __post_init__(self) -> None:
        self.db_url = normalise_db_url(self.db_url)

    @classmethod
    def from_data_dir(cls, data_dir: Path, db_url: str | None = None, **kw) -> "Settings":
        data_dir = Path(data_dir)
        store = SecretStore.in_dir(data_dir)
        url = db_url or f"sqlite:///{(data_dir / 'picoiot.db').resolve()}"
        return cls(db_url=url, data_dir=data_dir, secrets=store, **kw)

    @property
    def is_postgres(self) -> bool:
        return self.db_url.startswith("postgresql")
