"""Tables, engine, migrations. SQLAlchemy Core (no ORM): every query is visible and small."""
from __future__ import annotations

import select
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from .settings import Settings

T = TypeVar("T")
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def now_ms() -> int:
    return int(time.time() * 1000)


metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_ts", sa.BigInteger, nullable=False),
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("device_type", sa.String(64)),
    sa.Column("group_name", sa.String(64)),
    sa.Column("device_key", sa.String(256)),  # individually registered key; NULL = derived from the enrollment key
    sa.Column("firmware", sa.String(64)),
    sa.Column("capabilities", JSONType, nullable=False, default=list),
    sa.Column("address", sa.String(256)),
    sa.Column("reset_cause", sa.String(64)),
    sa.Column("created_ts", sa.BigInteger, nullable=False),
    sa.Column("first_seen", sa.BigInteger),
    sa.Column("last_seen", sa.BigInteger),
    sa.Column("registered_ts", sa.BigInteger),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("ttl_s", sa.Integer, nullable=False),
    sa.Column("heartbeat", JSONType),  # the last heartbeat body
    sa.Column("config_overrides", JSONType, nullable=False, default=dict),
    sa.Column("config_version", sa.Integer, nullable=False, default=0),
    sa.Column("config_report", JSONType),  # {version, status, reason, ts}
)

device_configs = sa.Table(
    "device_configs", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("config", JSONType, nullable=False),
    sa.Column("created_ts", sa.BigInteger, nullable=False),
)

device_types = sa.Table(
    "device_types", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("json_schema", JSONType, nullable=False),
    sa.Column("defaults", JSONType, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

groups = sa.Table(
    "groups", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("overrides", JSONType, nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

shadows = sa.Table(
    "shadows", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("desired", JSONType, nullable=False),
    sa.Column("reported", JSONType, nullable=False),
    sa.Column("meta", JSONType, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

alarms = sa.Table(
    "alarms", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("message", sa.String(1024), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # count = count_base (closed episodes) + episode_count (max running count seen in the current episode)
    sa.Column("count_base", sa.Integer, nullable=False),
    sa.Column("episode_count", sa.Integer, nullable=False),
    sa.Column("episodes", sa.Integer, nullable=False),
    sa.Column("first_ts", sa.BigInteger, nullable=False),
    sa.Column("last_ts", sa.BigInteger, nullable=False),
    sa.Column("acked", sa.Boolean, nullable=False),
    sa.Column("acked_by", sa.String(128)),
    sa.Column("acked_ts", sa.BigInteger),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("ns", "device_id", "key", name="alarms_dedup"),
    sa.Index("alarms_ns_state", "ns", "state"),
)

nonces = sa.Table(  # registration nonces already answered, until they expire (server/nonces.py: single use)
    "nonces", metadata,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("expires_ts", sa.BigInteger, nullable=False),
)


def _migration_1(conn: sa.Connection) -> None:
    for table in (devices, device_configs, device_types, groups, shadows, alarms, nonces):
        table.create(conn, checkfirst=True)


ota_keys = sa.Table(  # the Ed25519 public key a namespace's releases must be signed with (docs/ota.md)
    "ota_keys", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

ota_files = sa.Table(  # content-addressed release files
    "ota_files", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

ota_releases = sa.Table(
    "ota_releases", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(32), primary_key=True),
    sa.Column("manifest", sa.Text, nullable=False),  # the exact signed text
    sa.Column("signature", sa.String(128), nullable=False),
    sa.Column("created_ts", sa.BigInteger, nullable=False),
)

ota_assignments = sa.Table(  # kind "device" or "group"; a device's own assignment wins over its group's
    "ota_assignments", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("assigned_ts", sa.BigInteger, nullable=False),
)

ota_reports = sa.Table(  # the device's latest install result
    "ota_reports", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(256)),
    sa.Column("running", sa.String(32)),
    sa.Column("ts", sa.BigInteger, nullable=False),
)


def _migration_2(conn: sa.Connection) -> None:
    for table in (ota_keys, ota_files, ota_releases, ota_assignments, ota_reports):
        table.create(conn, checkfirst=True)


rollouts = sa.Table(  # staged OTA rollouts (docs/ota.md, Rollouts; server/rollouts.py)
    "rollouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("target", JSONType, nullable=False),  # {"namespace": true} | {"group": name} | {"devices": [ids]}
    sa.Column("stages", JSONType, nullable=False),  # [{"percent"|"devices", "soak_s"}], cumulative
    sa.Column("failure_threshold", sa.Float, nullable=False),
    sa.Column("allow_downgrade", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # running | paused | aborted | completed
    sa.Column("stage", sa.Integer, nullable=False),  # index of the current stage
    sa.Column("reason", sa.String(512)),  # why it paused / was aborted
    sa.Column("created_by", sa.String(128)),
    sa.Column("created_ts", sa.BigInteger, nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
    sa.Column("stage_started_ts", sa.BigInteger, nullable=False),
    sa.Index("rollouts_ns_state", "ns", "state"),
)

rollout_devices = sa.Table(
    "rollout_devices", metadata,
    sa.Column("rollout_id", sa.Integer, primary_key=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),  # the release this device is taken to
    sa.Column("from_version", sa.String(32)),
    # pending | downloading | installed | trial | committed | rolled_back | failed | skipped
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(256)),
    sa.Column("offered_ts", sa.BigInteger),  # assignment written (the device is offered the release)
    sa.Column("status_ts", sa.BigInteger, nullable=False),
)

rollout_locks = sa.Table(  # one active rollout per device: the primary key refuses a second one, across processes
    "rollout_locks", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("rollout_id", sa.Integer, nullable=False),
)

alert_receivers = sa.Table(  # where notifications go (server/alerting.py)
    "alert_receivers", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # webhook | alertmanager
    sa.Column("url", sa.String(512), nullable=False),
    sa.Column("secret", sa.String(512)),  # webhook HMAC key, sealed (server/sealing.py); never returned nor logged
    sa.Column("last_status", sa.String(16)),  # delivered | retrying | gave_up
    sa.Column("last_error", sa.String(256)),
    sa.Column("last_ts", sa.BigInteger),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

alert_rules = sa.Table(
    "alert_rules", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("event", sa.String(16), nullable=False),  # alarm | offline | rollout_paused | safe_mode
    sa.Column("min_severity", sa.String(16)),
    sa.Column("key_pattern", sa.String(128)),
    sa.Column("offline_for_s", sa.Integer),
    sa.Column("receivers", JSONType, nullable=False),
    sa.Column("updated_ts", sa.BigInteger, nullable=False),
)

alerts = sa.Table(  # every alert instance the rules produced: firing until its condition ends, then resolved
    "alerts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("fingerprint", sa.String(256), nullable=False),  # rule + subject: one open alert per condition
    sa.Column("labels", JSONType, nullable=False),
    sa.Column("annotations", JSONType, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # firing | resolved
    sa.Column("starts_ts", sa.BigInteger, nullable=False),
    sa.Column("ends_ts", sa.BigInteger),
    sa.Column("sent_ts", sa.BigInteger),  # last time it went into a notification (Alertmanager re-sends)
    sa.Index("alerts_open", "ns", "fingerprint", "state"),
)

alert_outbox = sa.Table(  # notifications waiting for delivery: in the database, so a restart loses none
    "alert_outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("receiver", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(64), nullable=False, unique=True),
    sa.Column("alerts", JSONType, nullable=False),  # [{labels, annotations, status, startsAt, endsAt}]
    sa.Column("state", sa.String(16), nullable=False),  # open (still grouping) | pending | delivered | gave_up
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_ts", sa.BigInteger, nullable=False),
    sa.Column("due_ts", sa.BigInteger, nullable=False),  # next attempt (or the end of the grouping wait)
    sa.Column("last_error", sa.String(256)),
    sa.Column("delivered_ts", sa.BigInteger),
    sa.Index("alert_outbox_due", "state", "due_ts"),
)


def _migration_3(conn: sa.Connection) -> None:
    for table in (rollouts, rollout_devices, rollout_locks, alert_receivers, alert_rules, alerts, alert_outbox):
        table.create(conn, checkfirst=True)


# ---------------------------------------------------------------- telemetry history, audit log, dashboard sign-in
telemetry_raw = sa.Table(  # every reading, kept `telemetry_raw_retention_s` (server/telemetry.py)
    "telemetry_raw", metadata,
    sa.Column("ns", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("field", sa.String(32), nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Index("telemetry_raw_series", "ns", "device_id", "field", "ts"),
    # the retention delete; on PostgreSQL a BRIN index (readings arrive in time order: tiny, next to free to keep up
    # at 20,000 inserts/s, where a second B-tree cost as much as the table)
    sa.Index("telemetry_raw_ts", "ts", postgresql_using="brin"),
)

telemetry_1m = sa.Table(  # 1-minute aggregates, kept `telemetry_agg_retention_s`; mean = vsum / n
    "telemetry_1m", metadata,
    sa.Column("ns", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("field", sa.String(32), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),  # ms, a multiple of 60,000
    sa.Column("vmin", sa.Float, nullable=False),
    sa.Column("vmax", sa.Float, nullable=False),
    sa.Column("vsum", sa.Float, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Index("telemetry_1m_bucket", "bucket"),
)

audit_log = sa.Table(  # append-only: triggers refuse UPDATE, DELETE (and TRUNCATE on PostgreSQL) for everyone
    "audit_log", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ns", sa.String(64), nullable=False),  # "*" for global resources (device types, namespaces)
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("sub", sa.String(128), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("via", sa.String(8), nullable=False),  # api | cli | ui
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.String(512), nullable=False),
    sa.Column("resource", sa.String(32), nullable=False),
    sa.Column("device_id", sa.String(64)),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("summary", JSONType, nullable=False),  # {request, before, after}: redacted, truncated
    sa.Index("audit_ns_ts", "ns", "ts"),
)

ui_login_tickets = sa.Table(  # one-time sign-in links already used (their jti), until they expire
    "ui_login_tickets", metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("expires_ts", sa.BigInteger, nullable=False),
)

_AUDIT_TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION picoiot_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'audit log is append-only'; END $$",
        "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION picoiot_audit_append_only()",
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION picoiot_audit_append_only()",
    ],
}


def _migration_4(conn: sa.Connection) -> None:
    for table in (telemetry_raw, telemetry_1m, audit_log, ui_login_tickets):
        table.create(conn, checkfirst=True)
    for stmt in _AUDIT_TRIGGERS.get(conn.dialect.name, []):
        conn.exec_driver_sql(stmt)


def _migration_5(conn: sa.Connection) -> None:
    # a sealed webhook secret (server/sealing.py) is longer than the 128 characters of its plaintext; SQLite does not
    # enforce lengths
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE alert_receivers ALTER COLUMN secret TYPE VARCHAR(512)")


#: Versioned migrations, applied in order inside one transaction each; append, never edit a released one.
MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [(1, _migration_1), (2, _migration_2),
                                                                  (3, _migration_3), (4, _migration_4),
                                                                  (5, _migration_5)]
LATEST = MIGRATIONS[-1][0]


def make_engine(settings: Settings) -> sa.Engine:
    url = settings.db_url
    if url.startswith("sqlite"):
        db_path = sa.make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  pool_size=8, max_overflow=16)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _rec):  # pragma: no cover - driver hook
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - driver hook
            # IMMEDIATE takes the write lock up front: a deferred transaction that later writes can fail with
            # SQLITE_BUSY without waiting for busy_timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine
    # named after its schema: an operator (or a test) can tell this server's connections apart in pg_stat_activity
    connect_args: dict[str, Any] = {"application_name": f"picoiot {settings.db_schema or ''}".strip()[:63]}
    if settings.db_schema:
        connect_args["options"] = f"-csearch_path={settings.db_schema}"
    engine = sa.create_engine(url, connect_args=connect_args, pool_size=10, max_overflow=20)
    sa.event.listen(engine, "checkout", _drop_if_closed_by_server)
    return engine


def _drop_if_closed_by_server(dbapi_conn, _rec, _proxy) -> None:
    """A pooled connection that PostgreSQL has closed (a restart, pg_terminate_backend, an idle timeout) is replaced
    before use. An idle connection has nothing to read unless the server has sent its goodbye (a FATAL message, then
    end of file), so one poll() of its socket tells, without the round trip that `pool_pre_ping` spends (a `SELECT 1`
    before every transaction). DisconnectionError makes the pool discard it and
    check out another."""
    try:
        fd = dbapi_conn.fileno()
    except Exception:  # already closed on our side
        raise sa.exc.DisconnectionError() from None
    p = select.poll()
    p.register(fd, select.POLLIN)
    if p.poll(0):
        raise sa.exc.DisconnectionError()


def migrate(engine: sa.Engine, settings: Settings) -> int:
    """Create the schema (PostgreSQL) and apply pending migrations; returns the version now applied."""
    pg = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if pg:
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727272)")  # several processes may start together
            if settings.db_schema:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{settings.db_schema}"')
        schema_migrations.create(conn, checkfirst=True)
        done = {r[0] for r in conn.execute(sa.select(schema_migrations.c.version))}
        for version, fn in MIGRATIONS:
            if version not in done:
                fn(conn)
                conn.execute(schema_migrations.insert().values(version=version, applied_ts=now_ms()))
    return LATEST


def applied_version(engine: sa.Engine) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar()


class DatabaseBusy(Exception):
    """The database thread pool's queue is full: answered 503 (the caller retries), never queued without bound."""


class Database:
    """The engine plus `await db.run(fn, *args)`: fn(conn, *args) in one transaction, on a worker thread."""

    #: worker threads running database calls
    threads = 24

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = make_engine(settings)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.limiter = anyio.CapacityLimiter(self.threads)
        self.max_queue = settings.max_db_queue

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        with self.engine.begin() as conn:
            return fn(conn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.limiter.borrowed_tokens >= self.threads and self.limiter.statistics().tasks_waiting >= self.max_queue:
            raise DatabaseBusy()
        return await anyio.to_thread.run_sync(self.run_sync, fn, *args, limiter=self.limiter)

    def dispose(self) -> None:
        self.engine.dispose()
