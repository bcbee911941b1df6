"""Lightweight simulated devices for the rollout tests: the device side of OTA over real HTTP (offer, manifest,
install reset = re-registration, report), without the firmware (tests/devices/test_rollout_devices.py runs the real
one). `crash` = releases that fail at boot on this device: it reports a rollback, as the firmware's boot guard does;
`fail` = releases it cannot install (a refused manifest, a download error): it reports `failed` without a reset."""
from __future__ import annotations

from cptest import LiveServer


class SimDevice:
    def __init__(self, server: LiveServer, device_id: str, crash: set[str] | None = None,
                 device_type: str | None = "relays", fail: set[str] | None = None):
        self.id = device_id
        self.crash = crash if crash is not None else set()
        self.fail = fail if fail is not None else set()
        self.server = server
        self.running = "0.1.0"
        self.device_type = device_type
        self.dev = server.register(device_id, device_type, firmware=self.running)
        self.seen: list[str] = []  # every version offered to it, in order

    def use(self, server: LiveServer) -> None:
        """Talk to another server process (same database) from now on."""
        self.server = server
        self.dev = server.register(self.id, self.device_type, firmware=self.running)

    def step(self) -> str | None:
        """One heartbeat and, if a release is offered, its install; returns the outcome."""
        c, dev = self.server.client, self.dev
        r = c.post(dev.services["heartbeat"], headers=dev.headers, json={"seq": 1, "firmware": self.running})
        assert r.status_code == 200, r.text
        r = c.get(dev.services["ota"], headers=dev.headers)
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        offer = r.json()
        version = offer["version"]
        self.seen.append(version)
        assert c.get(offer["manifest_url"], headers=dev.headers).status_code == 200
        if version in self.fail:
            r = c.post(dev.services["ota"] + "/report", headers=dev.headers, json={
                "version": version, "status": "failed", "reason": "OTAError: sha256 mismatch", "running": self.running})
            assert r.status_code == 200, r.text
            return "failed"
        # the reset into the new set (its trial boot)
        self.dev = self.server.register(self.id, self.device_type, firmware=self.running)
        if version in self.crash:
            body = {"version": version, "status": "rolled_back", "reason": "reset before healthy",
                    "running": self.running}
        else:
            self.running = version
            body = {"version": version, "status": "installed"}
        r = c.post(self.dev.services["ota"] + "/report", headers=self.dev.headers, json=body)
        assert r.status_code == 200, r.text
        return body["status"]
