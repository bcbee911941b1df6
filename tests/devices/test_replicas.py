"""Two control-plane replicas on one PostgreSQL database behind a round-robin TCP balancer, as a Kubernetes Service
spreads a device's connections (deploy/kubernetes/): a real simulated device (micropython) registers, long-polls and
reports through the balancer, and every desired write is made through the replica that does *not* hold the device's
long-poll at that moment, so each wake-up crosses processes (LISTEN/NOTIFY). Every write reaches the relay exactly once:
the simulated board's pin log shows one transition per write, none lost, none repeated."""
import asyncio
import shutil
import sys
import threading
from pathlib import Path

import httpx
import pytest

from devtest import BUNDLE, HEAP, MP_DIR, NS, RUNTIME, SCRIPTS, wait_until
from picoiot.procs import DeviceChild, ServerChild, device_settings, free_port, provision_over_api

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "controlplane"))
from cptest import PG_URL, drop_schema, new_schema, require_pg  # noqa: E402

pytestmark = pytest.mark.postgres
WRITES = 8


class RoundRobin:
    """A TCP balancer on 127.0.0.1: each new connection goes to the next backend port (counted per backend)."""

    def __init__(self, ports):
        self.ports = ports
        self.port = free_port()
        self.counts = [0] * len(ports)
        self._next = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    async def _conn(self, reader, writer):
        i = self._next
        self._next = (i + 1) % len(self.ports)
        self.counts[i] += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.ports[i])
        except OSError:
            writer.close()
            return

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                try:
                    w.close()
                except OSError:
                    pass
        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def stop(self):
        async def close():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _polls(server) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('picoiot_longpolls_waiting{kind="heartbeat"} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def replicas(tmp_path, bundle):
    require_pg()
    schema = new_schema()
    extra = ("--db-schema", schema, "--sweep-interval", "0.2", "--heartbeat-flush", "0.2")
    started = []
    try:
        a = ServerChild(tmp_path / "a", db=PG_URL, extra=extra)
        a.start()
        started.append(a)
        (tmp_path / "b").mkdir(mode=0o700)
        shutil.copy2(tmp_path / "a" / "secrets.json", tmp_path / "b" / "secrets.json")  # one Secret for both
        b = ServerChild(tmp_path / "b", db=PG_URL, extra=extra)
        b.start()
        started.append(b)
        lb = RoundRobin([a.port, b.port]).start()
        yield a, b, lb
        lb.stop()
    finally:
        for s in started:
            s.stop()
        drop_schema(schema)


def test_a_device_behind_a_round_robin_balancer_gets_every_write_exactly_once(replicas, tmp_path):
    a, b, lb = replicas
    from picoiot.server.auth import issue_token
    from picoiot.server.settings import Settings
    signing = Settings.from_data_dir(a.data_dir).secrets.signing_key
    admin = issue_token(signing, "test", NS, "admin", 3600)
    operator = {"Authorization": f"Bearer {issue_token(signing, 'test', NS, 'operator', 3600)}"}
    # an hourly heartbeat: only the long-poll can bring the writes within the waits below
    key = provision_over_api(a.url, admin, "rr-relays", "relays", NS,
                             overrides={"heartbeat_interval_s": 3600, "time": {"servers": []},
                                        "api": {"rate_per_s": 500, "burst": 500}})
    key["service_discovery_url"] = f"http://127.0.0.1:{lb.port}/api/devices"
    settings = device_settings(tmp_path / "dev.json", key, "relays", free_port(), tmp_path / "dev.flash")
    dev = DeviceChild(settings, runtime=RUNTIME, heap=HEAP["relays"], bundle=BUNDLE, log=tmp_path / "dev.log",
                      entry="pinlog_sim", extra_path=SCRIPTS if RUNTIME == "micropython" else MP_DIR)
    dev.start()
    try:
        dev.wait_ready(90)
        from picoiot.server.auth import device_local_token
        tok = device_local_token(key["device_key"], "rr-relays", "viewer", 3600, sub="test")

        def relay1():
            r = httpx.get(dev.url + "/gpio/relay1", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
            return r.json()["state"]

        versions = []
        crossed = {"a": 0, "b": 0}
        for i in range(WRITES):
            state = "on" if i % 2 == 0 else "off"
            holder = wait_until(lambda: "a" if _polls(a) >= 1 else "b" if _polls(b) >= 1 else None, 30,
                                "the device's long-poll to be held on a replica")
            other = b if holder == "a" else a
            crossed["b" if holder == "a" else "a"] += 1
            r = httpx.post(f"{other.url}/api/v1/namespaces/{NS}/devices/rr-relays/shadows/default", headers=operator,
                           json={"state": {"desired": {"relay1": state}}}, timeout=20)
            assert r.status_code == 200, r.text
            versions.append(r.json()["version"])
            wait_until(lambda: relay1() == state, 30, f"write {i} ({state}, through the other replica) to arrive")

        assert all(n > 0 for n in lb.counts), f"both replicas served the device: {lb.counts}"
        assert len(set(versions)) == WRITES and versions == sorted(versions), versions

        def pin_levels():
            import json
            try:
                ev = json.loads((tmp_path / "dev.flash" / "pinlog.json").read_text())
            except (OSError, ValueError):
                return None
            assert ev["dropped"] == 0
            lv = [level for _, pin, level in ev["events"] if pin == 2]
            return lv if lv and lv[-1] == 0 and len(lv) >= WRITES + 1 else None
        levels = wait_until(pin_levels, 10, "the pin log to show the last write")
        changes = [y for x, y in zip(levels, levels[1:]) if x != y]
        assert changes == [1, 0] * (WRITES // 2), f"one transition per write, none lost or repeated: {levels}"
        shadow = httpx.get(f"{a.url}/api/v1/namespaces/{NS}/devices/rr-relays/shadows/default", headers=operator,
                           timeout=10).json()
        wait_until(lambda: httpx.get(f"{b.url}/api/v1/namespaces/{NS}/devices/rr-relays/shadows/default",
                                     headers=operator, timeout=10).json()["state"]["delta"] == {}, 30,
                   "the device to report the last write")
        assert shadow["state"]["desired"]["relay1"] == "off"
    finally:
        dev.stop()
