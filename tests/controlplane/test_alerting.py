"""Alert notifications against the real control plane (SQLite and PostgreSQL) and real HTTP receivers."""
import logging
import threading

import httpx
import pytest
import sqlalchemy as sa

from cptest import wait_until
from picoiot import ota_cli
from picoiot.procs import free_port
from picoiot.server import db as tables
from picoiot.server.db import now_ms
from picoiot.server.sealing import PREFIX
from receivers import Receiver

AL = "/api/v1/namespaces/default/alerting"
SECRET = "s3cret-for-the-webhook-hmac"
#: fast rounds; devices heartbeating at 1 s are offline after 1 s of silence (TTL = 1 × 1 + 0)
FAST = {"fleet_tick_s": 0.1, "alert_group_wait_s": 0.3, "alert_retry_first_s": 0.2, "alert_retry_max_s": 0.5}
SHORT_TTL = {"default_heartbeat_s": 1, "ttl_missed": 1, "ttl_slack_s": 0}


@pytest.fixture
def receivers():
    started = []

    def make(kind, **kw):
        r = Receiver(kind, **kw)
        started.append(r)
        return r
    yield make
    for r in started:
        r.stop()
    assert not [e for r in started for e in r.errors], [r.errors for r in started]


def _put(server, path, body, code=200):
    r = server.client.put(f"{AL}/{path}", headers=server.auth("admin"), json=body)
    assert r.status_code == code, r.text
    return r.json()


def _alarm(server, dev, key, severity, state="firing"):
    r = server.client.post(dev.services["alarms"], headers=dev.headers,
                           json={"alarms": [{"key": key, "severity": severity, "message": f"{key} {state}",
                                             "state": state}]})
    assert r.status_code == 200, r.text


@pytest.mark.real_server
def test_webhook_signed_firing_and_resolved_by_rule(server_factory, receivers, tmp_path):
    server = server_factory(**FAST)
    hook = receivers("webhook", secret=SECRET)
    _put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})
    _put(server, "rules/relays", {"event": "alarm", "min_severity": "error", "key_pattern": "relay_*",
                                  "receivers": ["ops"]})
    _put(server, "rules/paused", {"event": "rollout_paused", "receivers": ["ops"]})
    dev = server.register("hook-1")
    _alarm(server, dev, "relay_stuck", "critical")
    _alarm(server, dev, "relay_slow", "warning")  # below the rule's severity
    _alarm(server, dev, "sensor_gone", "critical")  # another key
    wait_until(lambda: hook.alerts())
    [a] = hook.alerts()
    assert a["status"] == "firing" and a["labels"] == {"alertname": "relay_stuck", "namespace": "default",
                                                      "device": "hook-1", "alarm": "relay_stuck",
                                                      "severity": "critical"}
    assert "endsAt" not in a and a["annotations"]["summary"] == "relay_stuck firing"
    _alarm(server, dev, "relay_stuck", "critical", "resolved")
    wait_until(lambda: len(hook.alerts()) == 2)
    assert hook.alerts()[1]["status"] == "resolved" and hook.alerts()[1]["endsAt"] >= a["startsAt"]
    # the receiver shows its last delivery; the secret is never shown
    rc = server.client.get(f"{AL}/receivers", headers=server.auth("viewer")).json()["receivers"][0]
    assert rc["last_delivery"]["status"] == "delivered" and "secret" not in rc and rc["has_secret"]
    # a paused rollout notifies too, and its resume resolves the alert
    key = tmp_path / "ota.key"
    tok = server.token("admin")
    ota_cli.set_key(server.url, tok, "default", ota_cli.keygen(key))
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "main.py").write_text("print(9)\n")
    ota_cli.publish(server.url, tok, "default", tmp_path / "rel", "9.0", key)
    rid = ota_cli.rollout_create(server.url, tok, "default", "9.0", {"devices": ["hook-1"]}, [{"percent": 100}],
                                 600, 0.0, False)["id"]
    base = f"/api/v1/namespaces/default/ota/rollouts/{rid}"
    assert server.client.post(f"{base}/pause", headers=server.auth("admin"), json={"reason": "checking"}).is_success
    wait_until(lambda: any(x["labels"]["alertname"] == "rollout_paused" for x in hook.alerts()))
    p = next(x for x in hook.alerts() if x["labels"]["alertname"] == "rollout_paused")
    assert p["status"] == "firing" and p["annotations"]["summary"] == "checking"
    assert p["labels"]["rollout"] == str(rid) and p["labels"]["release"] == "9.0"
    assert server.client.post(f"{base}/resume", headers=server.auth("admin")).is_success
    wait_until(lambda: any(x["labels"]["alertname"] == "rollout_paused" and x["status"] == "resolved"
                           for x in hook.alerts()))


def test_alertmanager_gets_firing_and_resolved_offline_alerts(server_factory, receivers):
    server = server_factory(**FAST, **SHORT_TTL)
    am = receivers("alertmanager")
    _put(server, "receivers/am", {"kind": "alertmanager", "url": am.url})
    _put(server, "rules/offline", {"event": "offline", "offline_for_s": 0, "receivers": ["am"]})
    dev = server.register("am-1", device_type=None)  # no type: the server's 1 s heartbeat, a 1 s TTL
    # silent: the sweep calls it offline after its TTL, the rule fires
    wait_until(lambda: am.alerts(), timeout=20)
    [a] = am.alerts()
    assert a["labels"] == {"alertname": "device_offline", "namespace": "default", "device": "am-1",
                           "alarm": "device_offline", "severity": "error"} and "endsAt" not in a
    r = server.client.post(dev.services["heartbeat"], headers=dev.headers, json={"seq": 1})
    assert r.status_code == 200
    wait_until(lambda: len(am.alerts()) == 2)
    assert "endsAt" in am.alerts()[1] and am.alerts()[1]["startsAt"] == a["startsAt"]
    assert am.alerts()[1]["endsAt"] > a["startsAt"]


def test_mass_offline_is_one_grouped_notification_per_receiver(server_factory, receivers):
    server = server_factory(**{**FAST, "alert_group_wait_s": 1.0})
    hook, am = receivers("webhook", secret=SECRET), receivers("alertmanager")
    _put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})
    _put(server, "receivers/am", {"kind": "alertmanager", "url": am.url})
    _put(server, "rules/offline", {"event": "offline", "offline_for_s": 0, "receivers": ["ops", "am"]})
    n, old = 1000, now_ms() - 60_000
    # a fleet of 1,000 that was online and fell silent a minute ago (rows written directly: registering 1,000 devices
    # over HTTP would take most of a minute here); the server's own sweep takes them offline
    server.sql(lambda c: c.execute(tables.devices.insert(), [
        {"ns": "default", "device_id": f"m-{i:04d}", "capabilities": [], "created_ts": old, "last_seen": old,
         "online": True, "ttl_s": 1, "config_overrides": {}, "config_version": 0} for i in range(n)]))
    wait_until(lambda: hook.received and am.received, timeout=30)
    wait_until(lambda: server.client.get(f"{AL}/alerts", params={"state": "firing", "limit": 1000},
                                         headers=server.auth("viewer")).json()["alerts"].__len__() == n)
    # every alert went into one notification per receiver
    assert len(hook.received) == 1 and len(am.received) == 1
    assert len(hook.received[0]["body"]["alerts"]) == n and len(am.received[0]["body"]) == n
    assert hook.received[0]["body"]["firing"] == n
    # they come back: one resolved notification each
    server.sql(lambda c: c.execute(tables.devices.update().values(online=True, last_seen=now_ms() + 3_600_000,
                                                                  ttl_s=7200)))
    wait_until(lambda: len(hook.received) == 2 and len(am.received) == 2, timeout=30)
    assert hook.received[1]["body"]["resolved"] == n and all("endsAt" in a for a in am.received[1]["body"])


def test_retries_while_the_receiver_is_down_and_across_a_restart(server_factory, receivers):
    server = server_factory(**FAST)
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    _put(server, "receivers/ops", {"kind": "webhook", "url": url, "secret": SECRET})
    _put(server, "rules/all", {"event": "alarm", "receivers": ["ops"]})
    dev = server.register("retry-1")
    _alarm(server, dev, "pump", "warning")

    def notes():
        return server.client.get(f"{AL}/notifications", headers=server.auth("viewer")).json()["notifications"]
    wait_until(lambda: notes() and notes()[0]["attempts"] >= 2, timeout=20)
    n = notes()[0]
    assert n["state"] == "pending" and n["last_error"] and n["delivered_ts"] is None
    rc = server.client.get(f"{AL}/receivers", headers=server.auth("viewer")).json()["receivers"][0]
    assert rc["last_delivery"]["status"] == "retrying"
    # the control plane restarts with the notification still pending; the receiver comes up meanwhile
    server.stop()
    hook = receivers("webhook", secret=SECRET, port=port)
    server = server_factory(**FAST)
    wait_until(lambda: hook.received, timeout=20)
    [got] = hook.received
    assert got["body"]["idempotency_key"] == n["idempotency_key"] == got["headers"]["Idempotency-Key"]
    assert [a["labels"]["alarm"] for a in got["body"]["alerts"]] == ["pump"]
    wait_until(lambda: notes()[0]["state"] == "delivered")


@pytest.mark.real_server
def test_a_slow_or_failing_receiver_never_blocks_heartbeats_or_the_api(server_factory, receivers):
    server = server_factory(**{**FAST, "alert_timeout_s": 20})
    hook = receivers("webhook", secret=SECRET)
    hook.hold = threading.Event()
    _put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})
    _put(server, "rules/all", {"event": "alarm", "receivers": ["ops"]})
    dev = server.register("slow-1")
    _alarm(server, dev, "valve", "error")
    assert hook.in_handler.wait(20)  # a delivery is now held open by the receiver
    # heartbeats and operators' calls go on, each within a short client timeout, while it hangs
    with httpx.Client(base_url=server.url, timeout=2) as c:
        for i in range(30):
            assert c.post(dev.services["heartbeat"], headers=dev.headers, json={"seq": i}).status_code == 200
            assert c.get(f"{AL}/rules", headers=server.auth("viewer")).status_code == 200
    # now it answers 503 and is retried with backoff: heartbeats still answer, each within the short timeout
    hook.status = 503
    hook.hold.set()
    with httpx.Client(base_url=server.url, timeout=2) as c:
        def answering_while_failing():
            assert c.post(dev.services["heartbeat"], headers=dev.headers, json={"seq": 99}).status_code == 200
            return (c.get(f"{AL}/receivers", headers=server.auth("viewer")).json()
                    ["receivers"][0]["last_delivery"] or {}).get("error") == "HTTP 503"
        wait_until(answering_while_failing)


def test_bad_receivers_and_rules_are_refused(server):
    c, a = server.client, server.auth("admin")
    for url in ("ftp://example.com/x", "file:///etc/passwd", "javascript:alert(1)", "http://", "not a url",
                server.url + "/hook", server.url.replace("127.0.0.1", "localhost") + "/x",
                server.url.replace("127.0.0.1", "[::1]"), server.url.replace("127.0.0.1", "0.0.0.0")):
        r = c.put(f"{AL}/receivers/x", headers=a, json={"kind": "webhook", "url": url})
        assert r.status_code == 422 and r.json()["detail"]["path"] == "url", (url, r.text)
    r = c.put(f"{AL}/receivers/x", headers=a,
              json={"kind": "webhook", "url": "http://127.0.0.1:1/h", "secret": "short"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "secret"
    r = c.put(f"{AL}/receivers/x", headers=a, json={"kind": "smoke-signal", "url": "http://127.0.0.1:1/h"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "kind"
    # the operator chooses a webhook's key (no answer could carry a generated one back); Alertmanager takes none
    r = c.put(f"{AL}/receivers/x", headers=a, json={"kind": "webhook", "url": "http://127.0.0.1:1/h"})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "secret"
    r = c.put(f"{AL}/receivers/x", headers=a,
              json={"kind": "alertmanager", "url": "http://127.0.0.1:1", "secret": SECRET})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "secret"
    gen = c.put(f"{AL}/receivers/gen", headers=a, json={"kind": "webhook", "url": "http://127.0.0.1:1/h",
                                                         "secret": SECRET})
    assert gen.status_code == 200 and gen.json()["has_secret"] and "secret" not in gen.json()
    r = c.put(f"{AL}/rules/r", headers=a, json={"event": "alarm", "receivers": ["gen", "ghost"]})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "receivers.1"
    r = c.put(f"{AL}/rules/r", headers=a, json={"event": "offline", "receivers": ["gen"]})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "offline_for_s"
    r = c.put(f"{AL}/rules/r", headers=a, json={"event": "alarm", "min_severity": "loud", "receivers": ["gen"]})
    assert r.status_code == 422 and r.json()["detail"]["path"] == "min_severity"
    assert c.put(f"{AL}/rules/r", headers=a, json={"event": "alarm", "receivers": ["gen"]}).status_code == 200
    assert c.delete(f"{AL}/receivers/gen", headers=a).status_code == 409  # still used
    assert c.put(f"{AL}/rules/r", headers=server.auth("operator"),
                 json={"event": "alarm", "receivers": ["gen"]}).status_code == 403
    assert c.delete(f"{AL}/rules/r", headers=a).status_code == 200
    assert c.delete(f"{AL}/receivers/gen", headers=a).status_code == 200
    assert c.delete(f"{AL}/receivers/gen", headers=a).status_code == 404
    # nothing half-written by the refused calls
    assert server.sql(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(tables.alert_receivers))
                      .scalar()) == 0


def test_alertmanager_gets_firing_alerts_again_until_they_resolve(server_factory, receivers):
    # Alertmanager resolves an alert its client stops sending: firing alerts are re-sent every alert_resend_s
    server = server_factory(**{**FAST, **SHORT_TTL, "alert_resend_s": 0.3})
    am = receivers("alertmanager")
    _put(server, "receivers/am", {"kind": "alertmanager", "url": am.url})
    _put(server, "rules/offline", {"event": "offline", "offline_for_s": 0, "receivers": ["am"]})
    server.register("am-2", device_type=None)
    wait_until(lambda: len(am.alerts()) >= 3, timeout=20)
    first = am.alerts()[0]
    assert all(a["labels"] == first["labels"] and a["startsAt"] == first["startsAt"] and "endsAt" not in a
               for a in am.alerts()[:3])


def test_a_webhook_secret_is_write_only_sealed_at_rest_and_never_logged(server_factory, receivers, caplog):
    caplog.set_level(logging.DEBUG)
    server = server_factory(**FAST)
    down = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens: failed attempts, logged
    c, a = server.client, server.auth("admin")
    answers = [_put(server, "receivers/ops", {"kind": "webhook", "url": down, "secret": SECRET}),
               _put(server, "rules/all", {"event": "alarm", "receivers": ["ops"]})]
    dev = server.register("seal-1")
    _alarm(server, dev, "pump", "warning")
    wait_until(lambda: [n for n in c.get(f"{AL}/notifications", headers=a).json()["notifications"]
                        if n["attempts"] >= 2])
    hook = receivers("webhook", secret=SECRET)
    answers.append(_put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET}))
    _alarm(server, dev, "valve", "warning")
    wait_until(lambda: any(x["labels"]["alarm"] == "valve" for x in hook.alerts()))  # signed with the key: verified
    for path in (f"{AL}/receivers", f"{AL}/rules", f"{AL}/notifications", f"{AL}/alerts",
                 "/api/v1/namespaces/default/audit", "/openapi.json"):
        answers.append(c.get(path, headers=a).text)
    assert not [x for x in answers if SECRET in str(x)]
    assert "notification" in caplog.text and SECRET not in caplog.text  # the failed attempts were logged, not the key
    # at rest: sealed, not the key itself
    [stored] = server.sql(lambda conn: conn.execute(sa.select(tables.alert_receivers.c.secret)).scalars().all())
    assert stored.startswith(PREFIX) and SECRET not in stored


def test_plaintext_secrets_from_before_sealing_are_sealed_and_an_unreadable_one_says_so(server_factory, receivers):
    server = server_factory(**FAST)
    hook = receivers("webhook", secret=SECRET)
    _put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})
    _put(server, "rules/all", {"event": "alarm", "receivers": ["ops"]})
    RC = tables.alert_receivers
    server.sql(lambda conn: conn.execute(RC.update().values(secret=SECRET)))  # what an older server stored
    server.stop()
    server = server_factory(**FAST)  # same database
    dev = server.register("seal-2")
    _alarm(server, dev, "pump", "warning")
    wait_until(lambda: hook.alerts())  # the plaintext key still signs
    stored = server.sql(lambda conn: conn.execute(sa.select(RC.c.secret)).scalar())
    assert stored.startswith(PREFIX) and SECRET not in stored
    # a sealed value this server cannot open (another signing key sealed it): the delivery fails and says why
    server.sql(lambda conn: conn.execute(RC.update().values(secret=PREFIX + "AAAA" + stored[len(PREFIX) + 4:])))
    _alarm(server, dev, "valve", "warning")

    def last_error():
        rc = server.client.get(f"{AL}/receivers", headers=server.auth("viewer")).json()["receivers"][0]
        return (rc["last_delivery"] or {}).get("error") or ""
    wait_until(lambda: "signing key" in last_error())
    assert len(hook.alerts()) == 1


def test_a_device_starting_in_safe_mode_notifies_and_its_normal_boot_resolves(server_factory, receivers):
    server = server_factory(**FAST)
    hook = receivers("webhook", secret=SECRET)
    _put(server, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})
    _put(server, "rules/safe", {"event": "safe_mode", "receivers": ["ops"]})
    server.register("sm-1")
    server.register("sm-1", capabilities=["rest", "safe_mode"])  # what the firmware registers with in safe mode
    wait_until(lambda: hook.alerts())
    [a] = hook.alerts()
    assert a["status"] == "firing" and a["labels"] == {"alertname": "safe_mode", "namespace": "default",
                                                      "device": "sm-1", "alarm": "safe_mode", "severity": "critical"}
    server.register("sm-1")  # the next boot is a normal one
    wait_until(lambda: len(hook.alerts()) == 2)
    assert hook.alerts()[1]["status"] == "resolved" and hook.alerts()[1]["labels"] == a["labels"]


def test_retries_end_after_the_bounded_time(server_factory):
    server = server_factory(**{**FAST, "alert_give_up_s": 1.0})
    _put(server, "receivers/ops", {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook",
                                   "secret": SECRET})
    _put(server, "rules/all", {"event": "alarm", "receivers": ["ops"]})
    _alarm(server, server.register("give-1"), "pump", "warning")

    def notes():
        return server.client.get(f"{AL}/notifications", headers=server.auth("viewer")).json()["notifications"]
    wait_until(lambda: notes() and notes()[0]["state"] == "gave_up", timeout=20)
    assert notes()[0]["attempts"] >= 2 and notes()[0]["delivered_ts"] is None and notes()[0]["last_error"]
    rc = server.client.get(f"{AL}/receivers", headers=server.auth("viewer")).json()["receivers"][0]
    assert rc["last_delivery"]["status"] == "gave_up"


def test_a_webhook_at_the_control_planes_public_url_is_refused(server_factory):
    server = server_factory(public_url="https://cp.example.net:8443")
    c, a = server.client, server.auth("admin")
    for url, code in (("https://cp.example.net:8443/hook", 422), ("https://CP.example.net:8443", 422),
                      ("https://cp.example.net/hook", 200), ("https://hooks.example.net:8443/hook", 200)):
        r = c.put(f"{AL}/receivers/x", headers=a, json={"kind": "webhook", "url": url, "secret": SECRET})
        assert r.status_code == code, (url, r.text)
        if code == 422:
            assert r.json()["detail"]["path"] == "url"


def test_an_offline_rule_fires_only_after_its_duration(server_factory):
    server = server_factory(**FAST)
    _put(server, "receivers/ops", {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook",
                                   "secret": SECRET})
    _put(server, "rules/at-once", {"event": "offline", "offline_for_s": 0, "receivers": ["ops"]})
    _put(server, "rules/ten-min", {"event": "offline", "offline_for_s": 600, "receivers": ["ops"]})
    now = now_ms()
    # silent for two hours and for one minute; the sweep takes both offline
    server.sql(lambda c: c.execute(tables.devices.insert(), [
        {"ns": "default", "device_id": dev, "capabilities": [], "created_ts": ts, "last_seen": ts, "online": True,
         "ttl_s": 1, "config_overrides": {}, "config_version": 0}
        for dev, ts in (("off-old", now - 7_200_000), ("off-new", now - 60_000))]))

    def firing():
        alerts = server.client.get(f"{AL}/alerts", params={"state": "firing"}, headers=server.auth("viewer"))
        return {(a["rule"], a["labels"]["device"]) for a in alerts.json()["alerts"]}
    # both rules are evaluated in the same round: once the 0 s rule has both devices, the 600 s one was asked too
    wait_until(lambda: {("at-once", "off-old"), ("at-once", "off-new")} <= firing())
    assert {d for r, d in firing() if r == "ten-min"} == {"off-old"}


@pytest.mark.postgres
def test_two_server_processes_send_each_alert_once(pg_server_factory, receivers):
    a, b = pg_server_factory(**FAST), pg_server_factory(**FAST)
    hook = receivers("webhook", secret=SECRET)
    _put(a, "receivers/ops", {"kind": "webhook", "url": hook.url, "secret": SECRET})  # sealed by a
    _put(a, "rules/all", {"event": "alarm", "receivers": ["ops"]})
    dev = b.register("two-1")
    _alarm(b, dev, "pump", "warning")
    wait_until(lambda: hook.alerts())
    _alarm(a, dev, "valve", "warning")
    wait_until(lambda: len(hook.alerts()) >= 2)
    # by now both processes have evaluated and delivered many rounds: each alert came once, signed with the key one
    # process sealed and the other may have opened (the receiver checks every signature)
    assert [x["labels"]["alarm"] for x in hook.alerts()] == ["pump", "valve"]
