"""The audit log: every operator write (API, CLI, dashboard) appears once with its subject and role and a
before/after summary without secrets; device traffic is not in it; nothing can change or delete it."""
import pytest
import sqlalchemy as sa

from cptest import wait_until
from picoiot.server import db as tables
from picoiot.server.auth import issue_token

AUDIT = "/api/v1/namespaces/{ns}/audit"


def _h(server, role, sub, ns="default", **extra):
    return {"Authorization": f"Bearer {issue_token(server.settings.secrets.signing_key, sub, ns, role, 300)}",
            **extra}


def _entries(server, ns="default", role="viewer", token_ns=None, **params):
    r = server.client.get(AUDIT.format(ns=ns), headers=_h(server, role, "reader", token_ns or ns), params=params)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


def test_every_operator_write_appears_once_with_its_subject(server):
    c = server.client
    d = server.register("r1", device_type="relays")
    op, adm = _h(server, "operator", "alice"), _h(server, "admin", "bob")
    writes = [
        ("POST", "/api/v1/namespaces/default/devices/r1/shadows/default", op,
         {"state": {"desired": {"relay1": "on"}}}, 200, "state"),
        ("PUT", "/api/v1/namespaces/default/devices/r1/config", adm, {"overrides": {"heartbeat_interval_s": 20}},
         200, "config"),
        ("PUT", "/api/v1/namespaces/default/groups/hall", adm, {"overrides": {}}, 200, "group"),
        ("POST", "/api/v1/namespaces/default/devices", adm, {"device_id": "new-1", "device_type": "sensors"}, 201,
         "enrolment"),
        ("PUT", "/api/v1/namespaces/default/ota/key", adm, {"public_key": "ab" * 32}, 200, "ota"),
        ("PATCH", "/api/v1/namespaces/default/devices/r1", adm, {"group": "hall"}, 200, "device"),
        ("POST", "/api/v1/namespaces/default/devices/r1/shadows/default", _h(server, "viewer", "carol"),
         {"state": {"desired": {"relay1": "off"}}}, 403, "state"),  # refused writes are recorded too
    ]
    for method, path, headers, body, status, _ in writes:
        r = c.request(method, path, headers=headers, json=body)
        assert r.status_code == status, (path, r.text)
    # device traffic and reads are not operator writes
    assert c.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1}).status_code == 200
    assert c.get("/api/v1/namespaces/default/devices", headers=op).status_code == 200
    entries = _entries(server)
    assert len(entries) == len(writes)
    for (method, path, _, _, status, resource), e in zip(reversed(writes), entries):
        assert (e["method"], e["path"], e["status"], e["resource"]) == (method, path, status, resource)
    by_path = {(e["method"], e["path"], e["sub"]): e for e in entries}
    shadow = by_path[("POST", "/api/v1/namespaces/default/devices/r1/shadows/default", "alice")]
    assert shadow["role"] == "operator" and shadow["via"] == "api" and shadow["device_id"] == "r1"
    assert shadow["summary"]["request"] == {"state": {"desired": {"relay1": "on"}}}
    assert shadow["summary"]["before"]["state"]["desired"] == {}
    assert shadow["summary"]["after"]["state"]["desired"] == {"relay1": "on"}
    refused = by_path[("POST", "/api/v1/namespaces/default/devices/r1/shadows/default", "carol")]
    assert refused["role"] == "viewer" and refused["status"] == 403
    cfg = by_path[("PUT", "/api/v1/namespaces/default/devices/r1/config", "bob")]
    assert cfg["summary"]["before"]["overrides"] == {} and cfg["summary"]["after"]["overrides"] == \
        {"heartbeat_interval_s": 20}
    # secrets never enter the log: the enrolment answer's device key is redacted
    enrol = by_path[("POST", "/api/v1/namespaces/default/devices", "bob")]
    assert enrol["summary"]["after"]["device_key"] == "***" and enrol["summary"]["after"]["device_id"] == "new-1"
    assert "ab" * 32 not in str(by_path[("PUT", "/api/v1/namespaces/default/ota/key", "bob")])
    # filters
    assert [e["sub"] for e in _entries(server, sub="alice")] == ["alice"]
    assert {e["resource"] for e in _entries(server, resource="state")} == {"state"}
    assert len(_entries(server, device="r1")) == 4
    # another namespace's log is another namespace's
    assert _entries(server, ns="other") == []
    assert server.client.get(AUDIT.format(ns="other"), headers=_h(server, "viewer", "x")).status_code == 404


def test_global_writes_are_seen_with_a_token_for_all_namespaces(server):
    star = _h(server, "admin", "root", ns="*")
    assert server.client.post("/api/v1/namespaces", headers=star, json={"name": "lab"}).status_code == 201
    entries = _entries(server, role="admin", token_ns="*")
    assert [(e["namespace"], e["resource"], e["sub"]) for e in entries] == [("*", "namespace", "root")]
    assert _entries(server) == []  # not shown to a token of one namespace


def test_the_cli_is_named_as_such(server):
    r = server.client.post("/api/v1/namespaces/default/devices", json={"device_id": "c1"},
                           headers=_h(server, "admin", "cli", **{"User-Agent": "picoiot-cli"}))
    assert r.status_code == 201
    [e] = _entries(server)
    assert e["via"] == "cli" and e["sub"] == "cli"


def test_nothing_can_change_or_delete_the_log(server):
    adm = _h(server, "admin", "bob")
    server.register("r1", device_type="relays")
    assert server.client.post("/api/v1/namespaces/default/devices/r1/shadows/default", headers=adm,
                              json={"state": {"desired": {"relay1": "on"}}}).status_code == 200
    wait_until(lambda: len(_entries(server)) == 1)
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        assert server.client.request(method, AUDIT.format(ns="default"), headers=adm).status_code == 405
    a = tables.audit_log
    for stmt in (a.delete(), a.update().values(sub="mallory")):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            server.sql(lambda c: c.execute(stmt))
    if server.cp.db.is_postgres:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            server.sql(lambda c: c.exec_driver_sql("TRUNCATE audit_log"))
    # the rows are as written; the attempts through the API are themselves on record (405, nothing changed)
    entries = _entries(server)
    assert [(e["method"], e["status"]) for e in entries] == [("POST", 405), ("PATCH", 405), ("PUT", 405),
                                                            ("DELETE", 405), ("POST", 200)]
    assert {e["sub"] for e in entries} == {"bob"}
    # a deleted device's history stays
    assert server.client.delete("/api/v1/namespaces/default/devices/r1", headers=adm).status_code == 200
    assert [(x["method"], x["status"]) for x in _entries(server, device="r1")] == [("DELETE", 200), ("POST", 200)]


def test_a_refused_write_with_nul_or_nan_is_still_on_record(server):
    adm = _h(server, "admin", "bob")
    server.register("r1", device_type="relays")
    r = server.client.put("/api/v1/namespaces/default/devices/r1/config", headers={**adm, "Content-Type":
                          "application/json"}, content=b'{"overrides": {"a\\u0000b": NaN}}')
    assert r.status_code in (400, 422)
    [e] = _entries(server)
    assert e["status"] == r.status_code and e["summary"]["request"] == {"overrides": {"a\\u0000b": "nan"}}
    assert server.client.get("/metrics").text.count("picoiot_audit_failures_total 0.0") == 1


def test_cli_commands_on_the_data_directory_are_recorded(server, tmp_path):
    """`picoiot provision` and `picoiot token` work on the database and secrets directly (no server, no token): the
    audit entry names the local user and the CLI; the key and the token never enter the log."""
    import subprocess
    import sys
    st = server.settings
    db = ["--data-dir", str(st.data_dir), "--db", st.db_url.replace("postgresql+psycopg://", "postgresql://")]
    if st.db_schema:
        db += ["--db-schema", st.db_schema]
    cli = [sys.executable, "-m", "picoiot.cli"]
    out = subprocess.run([*cli, "provision", "cli-dev", *db], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    tok = subprocess.run([*cli, "token", "--role", "operator", *db], capture_output=True, text=True, timeout=60)
    assert tok.returncode == 0 and "warning" not in tok.stderr, tok.stderr
    entries = _entries(server)
    assert [(e["resource"], e["via"], e["method"], e["status"]) for e in entries] == [
        ("token", "cli", "POST", 200), ("enrolment", "cli", "POST", 201)]
    assert all(e["sub"].startswith("cli:") and e["role"] == "admin" for e in entries)
    assert entries[1]["device_id"] == "cli-dev" and entries[0]["summary"]["request"]["role"] == "operator"
    text = str(entries)
    assert tok.stdout.strip() not in text and '"device_key"' in out.stdout and "***" not in out.stdout
    assert out.stdout.split('"device_key": "')[1].split('"')[0] not in text
