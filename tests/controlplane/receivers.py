"""Real HTTP receivers for the notification tests: a webhook endpoint that verifies the HMAC signature, and an
Alertmanager v2 `POST /api/v2/alerts` endpoint that checks each body against the `postableAlerts` schema."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema

# Alertmanager's OpenAPI v2 (api/v2/openapi.yaml): postableAlerts = [postableAlert]; postableAlert = alert + startsAt,
# endsAt; alert = labels (required, labelSet) + generatorURL; labelSet = map of strings.
LABEL_SET = {"type": "object", "additionalProperties": {"type": "string"}}
POSTABLE_ALERTS = {
    "type": "array",
    "items": {"type": "object", "required": ["labels"],
              "properties": {"labels": LABEL_SET, "annotations": LABEL_SET,
                             "startsAt": {"type": "string", "format": "date-time"},
                             "endsAt": {"type": "string", "format": "date-time"},
                             "generatorURL": {"type": "string", "format": "uri"}},
              "additionalProperties": False}}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


class Receiver:
    """kind "webhook" (checks X-Picoiot-Signature with secret) or "alertmanager" (checks the schema). `status`: what
    to answer (e.g. 503 while "broken"); `hold`: an Event the handler waits for before answering (a slow receiver)."""

    def __init__(self, kind: str, secret: str | None = None, port: int = 0):
        self.kind, self.secret = kind, secret
        self.received: list[dict] = []  # {"headers", "body"} of every valid request
        self.errors: list[str] = []  # what a request got wrong (a test asserts this stays empty)
        self.status = 200
        self.hold: threading.Event | None = None
        self.in_handler = threading.Event()
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.in_handler.set()
                if rec.hold is not None:
                    rec.hold.wait(30)
                err = rec.check(self.path, dict(self.headers), body)
                if err:
                    rec.errors.append(err)
                    self.send_response(400)
                else:
                    if rec.status < 300:
                        rec.received.append({"headers": dict(self.headers), "body": json.loads(body)})
                    self.send_response(rec.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), H)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}" + ("/hook" if kind == "webhook" else "")
        # shutdown() waits for the serving loop's next look at its flag: every 0.05 s, not the default 0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def check(self, path: str, headers: dict, body: bytes) -> str | None:
        if self.kind == "webhook":
            if path != "/hook":
                return f"path {path}"
            ts, sig = headers.get("X-Picoiot-Timestamp"), headers.get("X-Picoiot-Signature", "")
            want = "sha256=" + hmac.new(self.secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
            if ts is None or not hmac.compare_digest(sig, want):
                return "bad signature"
            if json.loads(body).get("idempotency_key") != headers.get("Idempotency-Key"):
                return "idempotency key mismatch"
            return None
        if path != "/api/v2/alerts":
            return f"path {path}"
        doc = json.loads(body)
        try:
            jsonschema.validate(doc, POSTABLE_ALERTS)
        except jsonschema.ValidationError as e:
            return f"schema: {e.message}"
        for a in doc:
            for k in ("startsAt", "endsAt"):
                if k in a and not RFC3339.match(a[k]):
                    return f"{k} not RFC 3339: {a[k]}"
        return None

    def alerts(self) -> list[dict]:
        """Every alert received, in order (Alertmanager: the list items; webhook: each body's alerts)."""
        out = []
        for r in self.received:
            out.extend(r["body"] if self.kind == "alertmanager" else r["body"]["alerts"])
        return out

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()
