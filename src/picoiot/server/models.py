"""Wire schemas (docs/protocol.md), defined once and used by the server, the OpenAPI document and the tests."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel as _PydanticModel
from pydantic import ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

INT32 = 2**31 - 1
TS_MAX = 2**53  # milliseconds: far beyond any real clock, and exact in every JSON parser


def _bad_text(s: str) -> str | None:
    """Why `s` cannot be stored, or None: a NUL (PostgreSQL's text refuses it) or a lone surrogate (valid in JSON's
    \\u escapes, not encodable as UTF-8: SQLite would store it and every later read would fail to serialise)."""
    if "\x00" in s:
        return "NUL character"
    if not s.isascii():
        try:
            s.encode()
        except UnicodeEncodeError:
            return "lone surrogate (text that is not UTF-8)"
    return None


def _find_unstorable(value: Any, path: str) -> tuple[str, str] | None:
    """(path, reason) of the first value no database can hold and no JSON encoder can write back: a NUL character,
    a lone surrogate, a non-finite number (NaN/Infinity are not JSON) — in a value or a key; None if there is none.
    Iterative, so a deep document cannot exhaust the stack."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        if value is None or type(value) is int or type(value) is bool:  # most fields: decided at once
            continue
        if isinstance(value, str):
            why = _bad_text(value)
            if why:
                return path, why
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, "non-finite number"
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                sub = f"{path}.{k}" if path else str(k)
                why = _bad_text(str(k))
                if why:
                    return sub, why + " in a key"
                stack.append((v, sub))
        elif isinstance(value, (list, tuple)):
            for i in range(len(value) - 1, -1, -1):
                stack.append((value[i], f"{path}.{i}" if path else str(i)))
    return None


class BaseModel(_PydanticModel):
    # strict: `true` is no integer and "1" no number (the OpenAPI document says integer; lax mode took both)
    model_config = ConfigDict(strict=True)

    """Every wire model refuses, anywhere in its values, NUL characters (PostgreSQL cannot store them; no protocol
    field needs them), lone surrogates (SQLite stores them, then no read can encode them) and NaN/Infinity (Python's
    JSON parser accepts them; JSON does not). pydantic's own `str` fields refuse surrogates already; free-form
    documents (`dict[str, Any]`) need this walk."""

    @model_validator(mode="after")
    def _storable(self):
        for name in type(self).model_fields:
            found = _find_unstorable(getattr(self, name), name)
            if found is not None:
                # errors.py joins `at` to the model's own location: the detail names the whole path
                raise PydanticCustomError("unstorable", "not storable: {why}", {"why": found[1], "at": found[0]})
        return self

DeviceId = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
Severity = Literal["info", "warning", "error", "critical"]
Role = Literal["viewer", "operator", "admin"]


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


class Ok(BaseModel):
    ok: bool = True


# --- discovery ---
class ChallengeIn(BaseModel):
    device_id: str = DeviceId
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ChallengeOut(BaseModel):
    nonce: str
    expires_in: int


class RegisterIn(BaseModel):
    device_id: str = DeviceId
    namespace: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    nonce: str = Field(min_length=1, max_length=64)
    signature: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    device_type: str | None = Field(default=None, max_length=64)
    firmware: str | None = Field(default=None, max_length=64)
    capabilities: list[str] = Field(default_factory=list, max_length=32)
    address: str | None = Field(default=None, max_length=256)
    reset_cause: str | None = Field(default=None, max_length=64)


class Services(BaseModel):
    config: str
    state: str
    heartbeat: str
    alarms: str
    ota: str
    refresh: str
    ntp: str | None = None


class Intervals(BaseModel):
    heartbeat: int
    ttl: int
    config_poll: int
    time_sync: int


class RegisterOut(BaseModel):
    token: str
    token_expires_in: int
    namespace: str
    device_id: str
    services: Services
    intervals: Intervals
    server_time: int


class TokenOut(BaseModel):
    token: str
    token_expires_in: int


# --- config ---
class ConfigOut(BaseModel):
    version: int
    config: dict[str, Any]


class ConfigReportIn(BaseModel):
    version: int = Field(ge=0, le=INT32)
    status: Literal["applied", "rejected"]
    reason: str | None = Field(default=None, max_length=512)


class ConfigReport(BaseModel):
    version: int
    status: str
    reason: str | None = None
    ts: int


class DeviceConfigOut(BaseModel):
    version: int
    config: dict[str, Any]
    overrides: dict[str, Any]
    group: str | None = None
    device_type: str | None = None
    report: ConfigReport | None = None


# --- state ---
class ShadowStateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    desired: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None


class ShadowUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: ShadowStateIn
    version: int | None = Field(default=None, ge=0, le=INT32)


class ShadowState(BaseModel):
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]


class ShadowMeta(BaseModel):
    desired: dict[str, Any]
    reported: dict[str, Any]


class ShadowOut(BaseModel):
    state: ShadowState
    metadata: ShadowMeta
    version: int
    timestamp: int


class ConflictBody(BaseModel):
    error: str
    version: int


# --- heartbeat ---
class HeartbeatIn(BaseModel):
    # The hottest model (2,000/s at fleet scale): its NUL and NaN/Infinity checks are pydantic-core's own (the
    # finite-number check, a pattern on its one string), not the generic Python walk over every field (~2 µs).
    model_config = ConfigDict(allow_inf_nan=False)

    seq: int = Field(default=0, ge=0, le=TS_MAX)
    uptime: float | None = Field(default=None, ge=0, le=TS_MAX)
    mem_free: int | None = Field(default=None, ge=0, le=TS_MAX)
    mem_min: int | None = Field(default=None, ge=0, le=TS_MAX)  # lowest free heap since boot (the device's /info mem_free_min)
    #: MemoryErrors the device survived since boot, by where ("request", "ws", "config", "alarms", "ota")
    mem_errors: dict[Annotated[str, StringConstraints(max_length=16, pattern=r"^[a-z_]+$")],
                     Annotated[int, Field(ge=0, le=TS_MAX)]] | None = Field(default=None, max_length=8)
    rssi: int | None = Field(default=None, ge=-200, le=200)
    reconnects: int | None = Field(default=None, ge=0, le=TS_MAX)
    firmware: str | None = Field(default=None, max_length=64, pattern=r"^[^\x00]*$")
    config_version: int | None = Field(default=None, ge=0, le=INT32)
    state_version: int | None = Field(default=None, ge=0, le=INT32)
    #: telemetry riding on the heartbeat (server/telemetry.readings_from_heartbeat): {"field": value} or
    #: {"field": [[value, age_ms], …]}. Checked reading by reading there: a bad one is dropped and counted, never
    #: the heartbeat refused for it.
    t: dict[str, Any] | None = Field(default=None, max_length=32)

    @model_validator(mode="after")
    def _storable(self):  # replaces BaseModel's walk: the field constraints above already refuse NUL and NaN
        return self


class Pending(BaseModel):
    config_version: int
    state_version: int
    ota: Any = None


class HeartbeatOut(BaseModel):
    ack: int
    server_time: int
    ttl: int
    pending: Pending


# --- alarms ---
class AlarmIn(BaseModel):
    key: str = Field(min_length=1, max_length=128)
    severity: Severity = "warning"
    message: str = Field(default="", max_length=1024)
    count: int = Field(default=1, ge=1, le=INT32)
    first_ts: int | None = Field(default=None, ge=0, le=TS_MAX)
    last_ts: int | None = Field(default=None, ge=0, le=TS_MAX)
    state: Literal["firing", "resolved"] = "firing"


class AlarmBatchIn(BaseModel):
    alarms: list[AlarmIn] = Field(max_length=100)


class AlarmBatchOut(BaseModel):
    accepted: int


class AlarmOut(BaseModel):
    id: int
    namespace: str
    device_id: str
    key: str
    severity: str
    message: str
    state: str
    count: int
    episodes: int
    first_ts: int
    last_ts: int
    acked: bool
    acked_by: str | None = None
    acked_ts: int | None = None


class AlarmList(BaseModel):
    alarms: list[AlarmOut]


# --- operators: devices, types, groups, namespaces ---
class DeviceOut(BaseModel):
    namespace: str
    device_id: str
    device_type: str | None = None
    group: str | None = None
    firmware: str | None = None
    capabilities: list[str] = []
    address: str | None = None
    reset_cause: str | None = None
    online: bool
    ttl_s: int
    created_ts: int
    first_seen: int | None = None
    last_seen: int | None = None
    registered_ts: int | None = None
    config_version: int
    key_mode: Literal["derived", "individual"]
    heartbeat: dict[str, Any] | None = None
    config_report: ConfigReport | None = None


class DeviceList(BaseModel):
    devices: list[DeviceOut]


class DevicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: str | None = Field(default=None, max_length=64)
    device_type: str | None = Field(default=None, max_length=64)


class ProvisionIn(BaseModel):
    device_id: str = DeviceId
    device_type: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64)
    key_mode: Literal["derived", "individual"] = "derived"


class ProvisionOut(BaseModel):
    device_id: str
    device_key: str
    namespace: str
    service_discovery_url: str


class DeviceTypeIn(BaseModel):
    json_schema: dict[str, Any]
    defaults: dict[str, Any]


class DeviceTypeOut(BaseModel):
    name: str
    json_schema: dict[str, Any]
    defaults: dict[str, Any]
    version: int
    updated_ts: int


class DeviceTypeList(BaseModel):
    device_types: list[DeviceTypeOut]


class GroupIn(BaseModel):
    overrides: dict[str, Any]


class GroupOut(BaseModel):
    namespace: str
    name: str
    overrides: dict[str, Any]
    updated_ts: int


class GroupList(BaseModel):
    groups: list[GroupOut]


class OverridesIn(BaseModel):
    overrides: dict[str, Any]


class NamespaceIn(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class NamespaceList(BaseModel):
    namespaces: list[str]


class ShadowNames(BaseModel):
    shadows: list[str]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    database: bool
    migrations: int | None = None
    expected_migrations: int
    error: str | None = None


# --- telemetry (server/telemetry.py) ---
class TelemetryIn(_PydanticModel):
    # pydantic's own BaseModel, not ours: a NaN, a wrong type or a NUL must reach telemetry.check_reading, which
    # refuses it with the reading's index and counts it by reason (picoiot_telemetry_readings{outcome})
    readings: list[list[Any]] = Field(max_length=1000, description=(
        "[[field, ts, value], …]: field 1-32 of [A-Za-z0-9_.-], ts integer ms since the epoch (not later than now "
        "+ telemetry_max_skew_s, not older than the raw retention), value a finite number. One bad reading refuses "
        "the batch (422, nothing stored); over the device's rate 429."))


class TelemetryAccepted(BaseModel):
    accepted: int


class TelemetrySeries(BaseModel):
    field: str
    since: int
    until: int
    step: int = Field(description="bucket width, ms")
    source: Literal["raw", "1m"] = Field(description="raw readings, or the 1-minute aggregates")
    points: list[list[float]] = Field(description="[[bucket start ms, mean, min, max, count], …] oldest first; "
                                                  "empty buckets are left out")


class TelemetryLatest(BaseModel):
    values: dict[str, list[float]] = Field(description="field → [ts ms, value]: the newest reading of each field")


# --- audit log (server/audit.py) ---
class AuditEntry(BaseModel):
    id: int
    namespace: str
    ts: int
    sub: str
    role: str
    via: str
    method: str
    path: str
    resource: str
    device_id: str | None = None
    status: int
    summary: dict[str, Any]


class AuditList(BaseModel):
    entries: list[AuditEntry]
