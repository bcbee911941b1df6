import fwtest
import peers
from peers import asyncio
from iotlib import state as st
from iotlib.auth import AuthManager
from iotlib.http import HTTPClient, HTTPError
from iotlib.state import StateManager, StateError


def _merge(doc, patch):
    # the server's merge, written independently of iotlib.state.apply_patch
    for k, v in patch.items():
        if v is None:
            if k in doc:
                del doc[k]
        elif isinstance(v, dict) and isinstance(doc.get(k), dict):
            _merge(doc[k], v)
        elif isinstance(v, dict):
            doc[k] = {}
            _merge(doc[k], v)
        else:
            doc[k] = v


def _delta(desired, reported):
    out = {}
    for k, v in desired.items():
        r = reported.get(k)
        if isinstance(v, dict) and isinstance(r, dict):
            d = _delta(v, r)
            if d:
                out[k] = d
        elif v != r:
            out[k] = v
    return out


class Shadow:
    """A StateServer shadow per docs/protocol.md §4 (version, 409, partial updates with null deletes, long-poll)."""

    def __init__(self, desired=None, reported=None):
        self.desired = desired or {}
        self.reported = reported or {}
        self.version = 1
        self.fail = []  # statuses to answer next, instead of doing the work
        self.token = "t.o.k"
        self.race = False  # an operator writes just before every device update
        self.meta = {k: {"timestamp": 1} for k in self.desired}
        self.clock = 1

    def doc(self):
        return {"state": {"desired": self.desired, "reported": self.reported,
                          "delta": _delta(self.desired, self.reported)},
                "metadata": {"desired": self.meta}, "version": self.version, "timestamp": 1795000000000}

    def operator_sets(self, patch):
        _merge(self.desired, patch)
        self.clock += 1
        for k, v in patch.items():
            if v is None:
                self.meta.pop(k, None)
            else:
                self.meta[k] = {"timestamp": self.clock}
        self.version += 1

    def __call__(self, method, path, headers, body):
        if self.fail:
            return self.fail.pop(0), {"error": "injected"}
        if headers.get("authorization") != "Bearer " + self.token:
            return 401, {"error": "bad token"}
        if method == "GET":
            if "wait=" in path and "version=%d" % self.version in path:
                return 304, None
            return 200, self.doc()
        if self.race:
            self.operator_sets({"n": self.version})
        if "version" in body and body["version"] != self.version:
            return 409, {"error": "version conflict", "version": self.version}
        clear = body["state"].get("desired", {})
        assert all(v is None for v in clear.values()), "a device may only clear desired keys"
        _merge(self.desired, clear)
        for k in clear:
            self.meta.pop(k, None)
        _merge(self.reported, body["state"].get("reported", {}))
        self.version += 1
        return 200, self.doc()


class StubAuth:
    def __init__(self, token="t.o.k"):
        self.token = token
        self.services = {}
        self.invalidated = 0

    async def ensure_token(self, http):
        return self.token

    def invalidate(self):
        self.invalidated += 1


async def _start(shadow):
    app = peers.App(shadow)
    base = await app.start()
    url = base + "/api/v1/namespaces/ns/devices/d1/shadows/default"
    sm = StateManager(HTTPClient(timeout_ms=1000), StubAuth(), url)
    return app, sm


def test_full_sync_delivers_delta_and_reports_the_callback_result():
    async def go():
        sh = Shadow(desired={"relay1": "on", "relay2": "off"}, reported={"relay1": "off", "relay2": "off"})
        app, sm = await _start(sh)
        seen = []

        def cb(delta):
            seen.append(delta)
            return {k: delta[k] for k in delta}  # applied: report what we now have

        sm.on_delta(cb)
        try:
            await sm.sync_full()
        finally:
            await app.stop()
        assert seen == [{"relay1": "on"}]
        assert sh.reported == {"relay1": "on", "relay2": "off"} and sh.version == 2
        assert sm.version == 2 and sm.delta == {} and sm.online and not sm.need_full
        assert [(m, b) for m, p, h, b in app.log] == [
            ("GET", None), ("POST", {"state": {"reported": {"relay1": "on"}}, "version": 1})]
        assert sm.pending() == []
    fwtest.run(go())


def test_offline_queue_coalesces_exactly():
    sm = StateManager(None, StubAuth(), "http://x/")
    sm.report({"a": 1})
    sm.report({"b": {"c": 1}})
    sm.report({"b": {"d": 2}, "a": 2})
    assert sm.pending() == [{"a": 2, "b": {"c": 1, "d": 2}}]
    sm.report({"b": None})
    assert sm.pending() == [{"a": 2, "b": None}]
    sm.report({"b": {"e": 3}})  # set after delete: cannot be one patch, or the old fields would survive
    assert sm.pending() == [{"a": 2, "b": None}, {"b": {"e": 3}}]
    sm.report({"b": {"f": 4}, "g": [1, 2]})
    assert sm.pending() == [{"a": 2, "b": None}, {"b": {"e": 3, "f": 4}, "g": [1, 2]}]
    sm.report({})
    assert len(sm.pending()) == 2


def test_offline_updates_flush_on_reconnect_with_the_same_result_as_sent_one_by_one():
    async def go():
        sh = Shadow(reported={"b": {"old": 1}, "keep": True})
        app = peers.App(sh)
        base = await app.start()
        await app.stop()  # the server is down
        sm = StateManager(HTTPClient(timeout_ms=300), StubAuth(), base + "/shadow")
        sm.report({"a": 1})
        try:
            await sm.sync_full()
            assert False, "no server"
        except HTTPError:
            pass
        assert sm.need_full and not sm.online
        for p in ({"b": None}, {"b": {"e": 3}}, {"a": 2}):
            sm.report(p)
        app2 = peers.App(sh)
        # restart on a new port (the old one may be in TIME_WAIT); the device learns the URL again
        base2 = await app2.start()
        sm.url = base2 + "/shadow"
        try:
            await sm.sync_full()
        finally:
            await app2.stop()
        assert sh.reported == {"a": 2, "b": {"e": 3}, "keep": True}
        assert [m for m, p, h, b in app2.log] == ["GET", "POST", "POST"]  # full GET first
        assert sm.pending() == [] and sm.updates_sent == 2 and sm.online
    fwtest.run(go())


def test_queue_is_bounded():
    sm = StateManager(None, StubAuth(), "http://x/")
    sm.max_pending = 3
    for i in range(10):
        sm.report({"x": None})
        sm.report({"x": {"i": i}})
    q = sm.pending()
    assert len(q) <= 3 and sm.dropped > 0
    assert q[-1] == {"x": {"i": 9}}


def test_bad_reports_are_refused_and_lose_nothing():
    sm = StateManager(None, StubAuth(), "http://x/")
    sm.report({"ok": 1})
    fwtest.raises(ValueError, sm.report, ["not", "a", "dict"])
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
    e = fwtest.raises(ValueError, sm.report, deep)
    assert "deeper" in str(e)
    assert sm.pending() == [{"ok": 1}]


def test_409_refetches_reapplies_and_retries():
    async def go():
        sh = Shadow(desired={"relay1": "off"}, reported={"relay1": "off"})
        app, sm = await _start(sh)
        deltas = []
        sm.on_delta(lambda d: deltas.append(d))
        try:
            await sm.sync_full()
            assert sm.version == 1 and deltas == []
            sh.operator_sets({"relay1": "on"})  # the shadow moves on behind the device's back
            sm.report({"temp": 21.5})
            await sm.flush()
        finally:
            await app.stop()
        assert sm.conflicts == 1 and sh.reported == {"relay1": "off", "temp": 21.5}
        assert deltas == [{"relay1": "on"}]  # the refetch brought the operator's change
        posts = [b for m, p, h, b in app.log if m == "POST"]
        assert [b["version"] for b in posts] == [1, 2]
        assert sm.version == 3
    fwtest.run(go())


def test_persistent_conflict_gives_up_and_keeps_the_update():
    async def go():
        sh = Shadow()
        app, sm = await _start(sh)
        try:
            await sm.sync_full()
            sm.report({"x": 1})
            sh.race = True
            try:
                await sm.flush()
                assert False
            except StateError as e:
                assert "conflict" in str(e)
        finally:
            await app.stop()
        assert sm.pending() == [{"x": 1}] and sm.conflicts == sm.max_conflict_retries + 1
        assert [m for m, p, h, b in app.log[-3:]] == ["POST", "GET", "POST"]
    fwtest.run(go())


def test_refused_update_dropped_server_error_kept():
    async def go():
        sh = Shadow()
        app, sm = await _start(sh)
        try:
            await sm.sync_full()
            sm.report({"huge": "x"})
            sm.report({"huge": None})
            sm.report({"huge": {"a": 1}})  # two queue entries
            sh.fail = [413]
            await sm.flush()
            assert sm.dropped == 1 and sh.reported == {"huge": {"a": 1}}
            sm.report({"y": 2})
            sh.fail = [503]
            try:
                await sm.flush()
                assert False
            except StateError as e:
                assert "503" in str(e) and "injected" in str(e)
            assert sm.pending() == [{"y": 2}]
            await sm.flush()
            assert sh.reported == {"huge": {"a": 1}, "y": 2}
            sh.fail = [500]
            try:
                await sm.fetch()
                assert False
            except StateError as e:
                assert "500" in str(e)
        finally:
            await app.stop()
    fwtest.run(go())


def test_malformed_documents_are_errors():
    async def go():
        for answer in ([1], {"state": "x", "version": 1}, {"state": {}}):
            app = peers.App(lambda *a: (200, answer))
            base = await app.start()
            sm = StateManager(HTTPClient(timeout_ms=500), StubAuth(), base + "/s")
            try:
                await sm.sync_full()
                assert False
            except StateError as e:
                assert "malformed" in str(e)
            finally:
                await app.stop()
            assert sm.need_full
        fwtest.raises(StateError, StateManager(None, StubAuth())._url)
    fwtest.run(go())


def test_delta_callbacks_once_per_change_again_after_reconnect():
    async def go():
        sh = Shadow(desired={"r": "on"}, reported={"r": "off"})
        app, sm = await _start(sh)
        calls = []

        async def refuse(delta):  # async callbacks work; returning None reports nothing
            calls.append(delta)

        def broken(delta):
            raise RuntimeError("handler bug")

        sm.on_delta(broken)
        sm.on_delta(refuse)
        try:
            await sm.sync_full()
            await sm.fetch()
            assert calls == [{"r": "on"}]  # the same delta is not pushed again
            sm.disconnected()
            await sm.sync_full()
            assert calls == [{"r": "on"}, {"r": "on"}]  # but every reconnect delivers it in full
            sh.operator_sets({"r2": 1})
            await sm.fetch()
            assert calls[-1] == {"r": "on", "r2": 1}
        finally:
            await app.stop()
    fwtest.run(go())


def test_401_reregisters_with_a_real_auth_manager():
    import test_auth
    async def go():
        sd = test_auth.FakeSD()
        sh = Shadow(reported={"x": 0})

        def router(method, path, headers, body):
            if path.startswith("/api/devices/"):
                res = sd(method, path, headers, body)
                if path.endswith("/register") and res[0] == 200:
                    sh.token = res[1]["token"]  # the server accepts only the newest token
                return res
            return sh(method, path, headers, body)

        app = peers.App(router)
        sd.base = await app.start()
        auth = AuthManager("d1", test_auth.KEY, sd_url=sd.base + "/api/devices")
        sm = StateManager(HTTPClient(timeout_ms=1000), auth)
        try:
            await sm.sync_full()  # registers first (no token yet); the URL comes from services
            assert auth.registrations == 1 and sm.version == 1
            sh.token = "revoked"
            sm.report({"x": 1})
            await sm.flush()
        finally:
            await app.stop()
        assert auth.registrations == 2 and sh.reported == {"x": 1}
    fwtest.run(go())


def test_run_loop_syncs_flushes_and_fetches_on_notify():
    async def go():
        sh = Shadow(desired={"a": 1}, reported={})
        app, sm = await _start(sh)
        got = []
        sm.on_delta(lambda d: got.append(d) or d)
        task = asyncio.create_task(sm.run())

        async def until(cond):
            for _ in range(200):
                if cond():
                    return True
                await asyncio.sleep(0.01)
            return False

        try:
            assert await until(lambda: sh.reported == {"a": 1})
            sm.report({"b": 2})
            assert await until(lambda: sh.reported.get("b") == 2)
            sh.operator_sets({"c": 3})
            sm.notify(sh.version)
            assert await until(lambda: sh.reported.get("c") == 3)
            sm.notify(sm.version)  # nothing new: no request
            n = len(app.log)
            await asyncio.sleep(0.05)
            assert len(app.log) == n
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await app.stop()
        assert got == [{"a": 1}, {"c": 3}] and sm.last_error is None
    fwtest.run(go())


def test_run_loop_survives_a_server_outage():
    async def go():
        sh = Shadow(reported={})
        app, sm = await _start(sh)
        sm.retry_s = 0.05
        sh.fail = [500, 500]
        task = asyncio.create_task(sm.run())
        try:
            for _ in range(200):
                if sm.full_syncs:
                    break
                await asyncio.sleep(0.01)
            assert sm.full_syncs == 1 and sm.online
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await app.stop()
    fwtest.run(go())


def test_poll_long_waits_for_a_new_version():
    async def go():
        sh = Shadow(desired={"a": 1})
        app, sm = await _start(sh)
        try:
            await sm.sync_full()
            assert await sm.poll(1) is False
            assert "version=1&wait=1" in app.log[-1][1]
            sh.operator_sets({"a": 2})
            assert await sm.poll(1) is True and sm.desired == {"a": 2}
        finally:
            await app.stop()
    fwtest.run(go())


def test_patch_helpers():
    d = {"a": {"b": 1, "c": 2}, "x": 1}
    st.apply_patch(d, {"a": {"b": None, "d": {"e": 1}}, "x": None, "y": [1]})
    assert d == {"a": {"c": 2, "d": {"e": 1}}, "y": [1]}
    assert st.coalesce({"a": None}, {"a": {"b": 1}}) is None
    assert st.coalesce({"a": {"b": None}}, {"a": {"b": {"c": 1}}}) is None
    assert st.coalesce({"a": 1}, {"a": {"b": 1}}) == {"a": {"b": 1}}
    assert st.coalesce({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert st.depth({}) == 1 and st.depth(3) == 0 and st.depth({"a": {"b": {}}}) == 3


def test_override_clears_the_applied_desired_key_in_a_versioned_update():
    async def go():
        sh = Shadow(desired={"relay1": "on", "relay2": "off"}, reported={})
        app, sm = await _start(sh)
        deltas = []
        sm.on_delta(lambda d: deltas.append(d) or d)
        try:
            await sm.sync_full()
            assert deltas == [{"relay1": "on", "relay2": "off"}]
            # a safety timer switches relay1 off: the desired "on" is stale from now on
            sm.report({"relay1": "off"})
            sm.override("relay1", "off")
            sm.override("relay2", "off")  # what the shadow desires anyway: nothing to clear
            await sm.flush()
            assert sh.desired == {"relay2": "off"} and sh.reported["relay1"] == "off"
            last = [b for m, p, h, b in app.log if m == "POST"][-1]
            assert last == {"state": {"reported": {"relay1": "off"}, "desired": {"relay1": None}},
                            "version": last["version"]}
            await sm.fetch()
            assert deltas == [{"relay1": "on", "relay2": "off"}], "the stale value must never be delivered again"
            # a desired value written after the override is applied as usual
            sh.operator_sets({"relay1": "on"})
            await sm.fetch()
            assert deltas[-1] == {"relay1": "on"}
        finally:
            await app.stop()
    fwtest.run(go())


def test_override_conflict_keeps_a_newer_desired_value_and_never_delivers_the_stale_one():
    async def go():
        sh = Shadow(desired={"relay1": "on"}, reported={})
        app, sm = await _start(sh)
        deltas = []
        sm.on_delta(lambda d: deltas.append(d) or d)
        try:
            await sm.sync_full()
            sm.override("relay1", "off")
            sm.report({"relay1": "off"})
            # before the clear reaches it, the server moves on for another reason: the refetch still holds the
            # overridden value (same timestamp), which must not be delivered; the retried clear goes through
            sh.reported["x"] = 1
            sh.version += 1
            await sm.flush()
            assert sh.desired == {} and deltas == [{"relay1": "on"}] and sm.conflicts == 1
            # now an operator writes relay1 again (same value, new timestamp) while a clear for it is pending
            sh.operator_sets({"relay1": "on"})
            await sm.fetch()
            assert deltas[-1] == {"relay1": "on"}
            sm.override("relay1", "off")
            sh.operator_sets({"relay1": "on"})
            sm.report({"relay1": "off"})
            await sm.flush()
            assert sh.desired == {"relay1": "on"}, "a desired value written after the override is kept"
            assert deltas[-1] == {"relay1": "on"} and len(deltas) == 3, deltas
        finally:
            await app.stop()
    fwtest.run(go())
