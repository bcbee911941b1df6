"""A pooled PostgreSQL connection that the server closed is replaced before use, with no error answered.

The pool does not ping a connection before each transaction (that `SELECT 1` was a tenth of a registration's round
trips); instead a checkout polls the idle connection's socket, where a closed connection has left its goodbye
(db.py, `_drop_if_closed_by_server`). Here every pooled connection of the server is terminated from outside, as a
PostgreSQL restart or an operator's `pg_terminate_backend` would, and the next requests must all succeed."""
import pytest
import sqlalchemy as sa

from cptest import PG_URL

pytestmark = pytest.mark.postgres


def _terminate(application_name: str) -> int:
    """With a timeout, pg_terminate_backend returns once the backends have exited: their goodbye is in the sockets."""
    engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as c:
            return c.execute(sa.text("SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity "
                                     "WHERE application_name = :n"), {"n": application_name}).scalar()
    finally:
        engine.dispose()


def test_connections_terminated_by_postgresql_are_replaced_without_an_error(pg_server_factory):
    s = pg_server_factory()
    viewer = s.auth("viewer")
    d = s.register("relay-1")
    devices = "/api/v1/namespaces/default/devices"
    assert s.client.get(devices, headers=viewer).status_code == 200  # the pool holds idle connections now
    assert _terminate(f"picoiot {s.settings.db_schema}") >= 1
    for _ in range(3):  # more reads than the pool has idle connections left: each checkout meets a dead one
        r = s.client.get(devices, headers=viewer)
        assert r.status_code == 200, r.text
    assert s.register("relay-2").token
    r = s.client.post("/api/v1/namespaces/default/devices/relay-1/shadows/default", headers=s.auth("operator"),
                      json={"state": {"desired": {"relay1": "on"}}})
    assert r.status_code < 300, r.text
    assert s.client.post(d.services["heartbeat"], headers=d.headers, json={"seq": 1}).status_code == 200
