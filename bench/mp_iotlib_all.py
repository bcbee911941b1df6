# Workload (b) of bench/firmware_memory.py: every iotlib manager imported (from .mpy), constructed and exercised once
# against real peers started in this process — an HTTP server on 127.0.0.1 answering the control-plane calls of
# docs/protocol.md and a UDP SNTP responder — with the event-loop lag monitor running throughout. Prints
# `OK max_stall_ms=<n>` when every step did what it should; anything else (an exception, a MemoryError) is a failure.
# Runs under the unix micropython (and CPython: `python bench/mp_iotlib_all.py` with firmware/ on sys.path).
import gc
import json
import os
import socket

if os.getenv("PICOIOT_SIM_IMG") and "/rom" not in __import__("sys").path:  # the simulated board in place from
    # its own image (test equipment, not counted), unless mp_import_cost mounted it already
    import boot_romfs
    boot_romfs.mount(os.getenv("PICOIOT_SIM_IMG"))

from iotlib.compat import asyncio, epoch_ms  # noqa: E402

DEVICE = "bench-1"
DEVICE_KEY = "6b6579" * 10
SERVER_KEY = "server-signing-key"
NS = "default"


def _port_base():
    b = os.urandom(2)
    return 20000 + ((b[0] << 8) | b[1]) % 30000


def check(ok, what):
    if not ok:
        raise AssertionError(what)


# ---- the control-plane peer (docs/protocol.md §2-6), just enough of it, with real checks --------------------------
class Peer:
    def __init__(self):
        self.base = None
        self.nonce = None
        self.cfg = {"version": 1, "config": {"sampling": {"interval_ms": 500}, "time": {"servers": []}}}
        self.state = {"desired": {"relay1": "on"}, "reported": {}}
        self.version = 1
        self.alarms = {}
        self.heartbeats = 0
        self.reports = []
        self.calls = 0
        self.ntp_port = None

    def doc(self):
        d, r = self.state["desired"], self.state["reported"]
        delta = {}
        for k in d:
            if r.get(k) != d[k]:
                delta[k] = d[k]
        return {"state": {"desired": d, "reported": r, "delta": delta}, "version": self.version,
                "metadata": {}, "timestamp": epoch_ms()}

    def authorized(self, headers):
        from iotlib import auth
        h = headers.get("authorization", "")
        try:
            c = auth.jwt_decode(h[7:], SERVER_KEY)
        except auth.AuthError:
            return False
        return c.get("sub") == DEVICE

    def token(self):
        from iotlib import auth
        now = epoch_ms() // 1000
        return auth.jwt_encode({"sub": DEVICE, "ns": NS, "role": "device", "iat": now, "exp": now + 3600}, SERVER_KEY)

    def handle(self, method, path, headers, body):
        from iotlib import auth
        self.calls += 1
        b = self.base
        sd = "/api/devices/"
        dev = "/api/v1/devices/" + DEVICE
        state = "/api/v1/namespaces/%s/devices/%s/shadows/default" % (NS, DEVICE)
        if path == sd + "challenge":
            self.nonce = auth.hexlify(os.urandom(16))
            return 200, {"nonce": self.nonce, "expires_in": 60}, None
        if path == sd + "register":
            want = auth.hexlify(auth.hmac_sha256(DEVICE_KEY, "%s|%s" % (self.nonce, DEVICE)))
            if self.nonce is None or body.get("nonce") != self.nonce or body.get("signature") != want:
                return 401, {"error": "bad signature"}, None
            self.nonce = None  # single use
            return 200, {"token": self.token(), "token_expires_in": 3600, "namespace": NS, "device_id": DEVICE,
                         "services": {"config": b + dev + "/config", "state": b + state,
                                      "heartbeat": b + dev + "/heartbeat", "alarms": b + dev + "/alarms",
                                      "refresh": b + sd + "refresh", "ntp": "127.0.0.1:%d" % self.ntp_port},
                         "intervals": {"heartbeat": 10, "ttl": 35}, "server_time": epoch_ms()}, None
        if not self.authorized(headers):
            return 401, {"error": "missing or bad token"}, None
        if path == sd + "refresh":
            return 200, {"token": self.token(), "token_expires_in": 3600}, None
        if path.startswith(dev + "/config"):
            if path.endswith("/report"):
                self.reports.append(body)
                return 200, {"ok": True}, None
            etag = '"%d"' % self.cfg["version"]
            if headers.get("if-none-match") == etag:
                return 304, None, etag
            return 200, self.cfg, etag
        if path.startswith(state):
            if method == "POST":
                v = body.get("version")
                if v is not None and v != self.version:
                    return 409, {"error": "version conflict", "version": self.version}, None
                rep = self.state["reported"]
                for k, val in body["state"]["reported"].items():
                    if val is None:
                        rep.pop(k, None)
                    else:
                        rep[k] = val
                self.version += 1
            return 200, self.doc(), None
        if path == dev + "/heartbeat":
            self.heartbeats += 1
            return 200, {"ack": body["seq"], "server_time": epoch_ms(), "ttl": 35,
                         "pending": {"config_version": self.cfg["version"], "state_version": self.version,
                                     "ota": None}}, None
        if path == dev + "/alarms":
            for a in body["alarms"]:
                self.alarms[a["key"]] = a
            return 200, {"accepted": len(body["alarms"])}, None
        return 404, {"error": "no such path: " + path}, None

    async def serve(self, reader, writer):
        try:
            line = await reader.readline()
            method, path = line.decode().split()[:2]
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, v = h.decode().split(":", 1)
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            body = json.loads(await reader.readexactly(n)) if n else None
            path = path.split("?", 1)[0]
            status, obj, etag = self.handle(method, path, headers, body)
            data = b"" if obj is None else json.dumps(obj).encode()
            writer.write(("HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                          % (status, len(data), "" if etag is None else "ETag: %s\r\n" % etag)).encode())
            writer.write(data)
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    async def start(self):
        base = _port_base()
        for i in range(40):
            try:
                self.srv = await asyncio.start_server(self.serve, "127.0.0.1", base + i)
                self.base = "http://127.0.0.1:%d" % (base + i)
                return
            except OSError:
                pass
        raise OSError("no free TCP port")


class SNTPResponder:
    """A stratum-2 SNTP server on 127.0.0.1 answering from the local clock."""

    async def start(self):
        base = _port_base()
        for i in range(40):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(socket.getaddrinfo("127.0.0.1", base + i)[0][-1])
            except OSError:
                s.close()
                continue
            s.setblocking(False)
            self.sock, self.port = s, base + i
            self.task = asyncio.create_task(self.serve())
            self.answered = 0
            return self.port
        raise OSError("no free UDP port")

    async def serve(self):
        from iotlib import timesync
        while True:
            req, addr = await timesync.udp_recvfrom(self.sock, 128)
            pkt = bytearray(48)
            pkt[0] = (4 << 3) | 4  # LI 0, version 4, mode 4 (server)
            pkt[1] = 2
            pkt[24:32] = req[40:48]
            now = epoch_ms()
            pkt[32:40] = timesync.ms_to_ntp(now)
            pkt[40:48] = timesync.ms_to_ntp(now)
            self.sock.sendto(pkt, addr)
            self.answered += 1


# ---- the flash directory ----------------------------------------------------------------------------------------
def flash_dir():
    tmp = os.getenv("TMPDIR") or "/tmp"
    b = os.urandom(4)
    return "%s/picoiot-bench-%02x%02x%02x%02x" % (tmp, b[0], b[1], b[2], b[3])


def rmtree(path):
    try:
        names = [e[0] for e in os.ilistdir(path)]
    except AttributeError:  # CPython
        names = os.listdir(path)
    except OSError:
        return
    for n in names:
        p = path + "/" + n
        try:
            os.remove(p)
        except OSError:
            rmtree(p)
    os.rmdir(path)


# ---- the workload -------------------------------------------------------------------------------------------------
SCHEMA = {"sampling": {"interval_ms": {"type": "int", "min": 10, "max": 60000}},
          "time": {"servers": {"type": "list", "items": {"type": "str"}}, "interval_s": {"type": "int", "min": 16}}}
DEFAULTS = {"sampling": {"interval_ms": 1000}, "time": {"servers": [], "interval_s": 3600}}


async def workload(flash):
    import picosim as sim
    from iotlib import metrics, log
    sim.configure(flash_root=flash)
    lag_task = asyncio.create_task(metrics.loop_lag_monitor(20))

    # Logger: file sink with rotation, masking, an exception with its traceback.
    log.configure(level="info", console=False, path=flash + "/log/device.log", max_bytes=2048, backups=1)
    lg = log.get("bench")
    lg.info("boot", wifi_password="hunter2", note="Authorization: Bearer abc.def")
    try:
        {}["missing"]
    except KeyError as e:
        lg.exc("expected failure", e)

    # Metrics registry: counter with labels, gauge, the built-ins (heap, largest block, loop lag).
    requests = metrics.counter("bench_requests", "Requests made by the bench.", ("kind",))
    up = metrics.gauge("bench_up", "1 while the bench runs.")
    metrics.register_builtins()
    up.set(1)

    peer = Peer()
    ntp = SNTPResponder()
    peer.ntp_port = await ntp.start()
    await peer.start()

    # NetworkManager on the simulated cyw43: one failed attempt (AP not found), then up.
    from iotlib import NetworkManager
    net = NetworkManager("bench-ap", "wifi-secret")
    net.poll_ms = 5
    net.backoff_base_ms = 10
    sim.board.wlan.script([1, -2], [1, 2, 3])
    check(await net.connect(attempts=3), "wifi up")
    net.io_failed()
    net.io_ok()
    check(net.check() and net.stats()["failures"] == 1, "wifi stats")

    from iotlib import HTTPClient
    http = HTTPClient(timeout_ms=5000)

    # AuthManager: challenge-response registration, refresh, verification of an operator token for the device API.
    from iotlib import AuthManager, RateLimiter
    from iotlib import auth as authmod
    am = AuthManager(DEVICE, DEVICE_KEY, sd_url=peer.base + "/api/devices",
                     info={"device_type": "bench", "firmware": "0.1.0", "capabilities": ["rest"]})
    await am.ensure_token(http)
    check(am.registrations == 1 and am.services.get("state"), "registered")
    await am.refresh(http)
    now = epoch_ms() // 1000
    claims = am.verify("Bearer " + authmod.jwt_encode({"sub": "op", "role": "operator", "exp": now + 60},
                                                      DEVICE_KEY))
    check(authmod.role_at_least(claims["role"], "viewer"), "operator token")
    rl = RateLimiter(5, 2)
    check(rl.allow("1.2.3.4")[0] and rl.allow("1.2.3.4")[0] and not rl.allow("1.2.3.4")[0], "rate limit")
    requests.inc(kind="auth")

    # AlarmManager: dedup, a persisted critical alarm, a resolved one, an exception report; delivered in one flush.
    from iotlib import AlarmManager
    alarms = AlarmManager(path=flash + "/alarms")
    alarms.fire("sensor.bme280", "warning", "I2C read failed")
    alarms.fire("sensor.bme280", "warning", "I2C read failed")
    alarms.fire("power.brownout", "critical", "supply below 3.0 V")
    alarms.clear("power.brownout")
    try:
        1 // 0
    except ZeroDivisionError as e:
        alarms.report_exception("task.sampler", e)

    # ConfigManager: fetch + apply through a hot-reload callback + report; 304 on the next round; a bad one refused.
    from iotlib import ConfigManager
    seen = []
    cm = ConfigManager(SCHEMA, DEFAULTS, path=flash + "/config.json")
    cm.on_change("sampling", seen.append)
    cm.load()
    changed, _ = await cm.fetch(http, am.services["config"], am.token)
    check(changed and seen == [{"interval_ms": 500}] and peer.reports[-1]["status"] == "applied", "config applied")
    changed, _ = await cm.fetch(http, am.services["config"], am.token)
    check(not changed, "config 304")
    ok, reason = cm.apply({"sampling": {"interval_ms": 1}}, 2)
    check(not ok and "sampling.interval_ms" in reason and cm.version == 1, "config rejected")
    requests.inc(kind="config")

    # StateManager: full sync acts on the delta, a report goes through a 409 (another writer bumped the version).
    from iotlib import StateManager
    sm = StateManager(http, am)

    def on_delta(delta):
        return {"relay1": delta.get("relay1")}
    sm.on_delta(on_delta)
    await sm.sync_full()
    check(peer.state["reported"].get("relay1") == "on", "state delta applied")
    peer.version += 1  # someone else wrote meanwhile
    sm.report({"uptime": 1, "relay2": None})
    await sm.flush()
    check(sm.conflicts == 1 and peer.state["reported"].get("uptime") == 1, "state 409 handled")
    requests.inc(kind="state")

    # TimeSyncManager: SNTP against the local responder; its alarms go to the AlarmManager.
    from iotlib import TimeSyncManager
    ts = TimeSyncManager([am.services["ntp"]], on_alarm=alarms.fire, on_clear=alarms.clear)
    check(await ts.sync() and ts.synced and abs(ts.now_ms() - epoch_ms()) < 60000, "time synced")

    # WatchdogManager: a supervised critical task that checks in, heartbeats answered by the peer (their pending
    # state version goes to the StateManager), the simulated hardware WDT fed by run().
    from iotlib import WatchdogManager
    wd = WatchdogManager(wdt_timeout_ms=8000, on_crash=alarms.report_exception)
    wd.tick_ms = 20
    wd.heartbeat_interval_ms = 30
    crashed = []

    async def sampler():
        if not crashed:
            crashed.append(1)
            raise ValueError("first run fails")
        while True:
            wd.checkin("sampler")
            await asyncio.sleep(0.01)

    async def send(body):
        r = await http.request("POST", am.services["heartbeat"], json=body, headers=am.auth_header())
        return r.json()

    wd.restart_base_ms = 10
    wd.supervise("sampler", sampler)
    wd.heartbeat(send, payload=lambda: {"rssi": net.rssi, "state_version": sm.version},
                 on_answer=lambda a: sm.notify(a["pending"]["state_version"]))
    wd_task = asyncio.create_task(wd.run())
    while wd.acks < 2 or wd.feeds < 3:
        await asyncio.sleep(0.01)
    wd_task.cancel()
    try:
        await wd_task
    except asyncio.CancelledError:
        pass
    st = wd.stats()
    check(st["tasks"]["sampler"]["crashes"] == 1 and wd.boot_report()["reset_cause"], "watchdog")

    # Everything the device fired reaches the control plane in one flush.
    check(await alarms.flush(http, am.services["alarms"], am.token), "alarms flushed")
    check(peer.alarms["sensor.bme280"]["count"] == 2 and "task.sampler" in peer.alarms
          and peer.alarms["power.brownout"]["state"] == "resolved", "alarms delivered")
    requests.inc(kind="alarms")

    text = metrics.REGISTRY.render()
    check('bench_requests_total{kind="state"} 1' in text and "iotlib_loop_lag_max_ms" in text, "metrics")
    check(log.stats()["dropped"] == 0 and log.stats()["written"] > 5, "log written")

    lag_task.cancel()
    ntp.task.cancel()
    ntp.sock.close()
    peer.srv.close()
    await peer.srv.wait_closed()
    await asyncio.sleep(0)
    return metrics.LOOP_LAG.max_ms


def main():
    flash = flash_dir()
    try:
        stall = asyncio.run(workload(flash))
    finally:
        rmtree(flash)
    gc.collect()
    print("OK max_stall_ms=%d" % stall)


if __name__ == "__main__":
    main()
