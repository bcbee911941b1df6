import json
import fwtest
import webclient as wc
from iotlib.compat import asyncio, epoch_ms
from iotlib.auth import AuthManager, jwt_encode
from iotlib.metrics import Metrics
from iotlib.web import DeviceWeb
from iotlib.wsstream import WSStream

KEY = "k" * 64
DEV = "sensor-1"


def token(role):
    return jwt_encode({"sub": "t", "role": role, "aud": DEV, "exp": epoch_ms() // 1000 + 600}, KEY)


def snap(seq, **values):
    return {"seq": seq, "ts": 1795000000000 + seq, "values": values or {"t": 20.5, "h": 40.0, "p": 1000.1}}


def serve(fn, **web_kw):
    async def go():
        web = DeviceWeb(AuthManager(DEV, KEY).verify, metrics=Metrics())
        web.configure({"rate_per_s": 1000, "burst": 1000})
        for k in web_kw:
            setattr(web, k, web_kw[k])
        stream = WSStream(web, fields=lambda: ["h", "p", "t"])
        admin = WSStream(web, path="/ws-admin", role="admin")
        port = await wc.start(web)
        try:
            await fn(stream, port)
        finally:
            await web.stop()
            # sessions still open end the way a dropped client does, closing their sockets before the loop ends
            for s in (stream, admin):
                for c in list(s.clients):
                    s._drop(c, "test over")
            await wait_until(lambda: not stream.clients and not admin.clients)
    fwtest.run(go())


async def wait_until(cond, n=200):
    for _ in range(n):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return False


def test_auth_checked_before_upgrade():
    async def t(stream, port):
        s, h, body = await wc.ws_connect(port)
        assert s == 401 and body == {"error": "missing token"} and h["www-authenticate"] == "Bearer"
        assert h[":version"] == "HTTP/1.1"  # RFC 6455 clients refuse an HTTP/1.0 answer
        s, h, body = await wc.ws_connect(port, token="x.y.z")
        assert s == 401
        s, h, body = await wc.ws_connect(port, "/ws-admin", token=token("operator"))
        assert s == 403 and body == {"error": "role admin required"}
        assert stream.clients == []
        s, h, c = await wc.ws_connect(port, token=token("viewer"))
        assert s == 101 and "sec-websocket-protocol" not in h
        await c.close()
        s, h, c = await wc.ws_connect(port, "/ws?token=" + token("viewer"))
        assert s == 101
        await c.close()
        s, h, c = await wc.ws_connect(port, protocols=["picoiot", "bearer." + token("viewer")])
        assert s == 101 and h["sec-websocket-protocol"] == "picoiot"
        await c.close()
    serve(t)


def test_frames_broadcast_serialised_once():
    async def t(stream, port):
        c1 = (await wc.ws_connect(port, token=token("viewer")))[2]
        c2 = (await wc.ws_connect(port, token=token("viewer")))[2]
        assert await wait_until(lambda: len(stream.clients) == 2)
        for i in range(1, 4):
            stream.publish(snap(i))
        for c in (c1, c2):
            for i in range(1, 4):
                f = await c.recv_json()
                assert f == {"seq": i, "ts": 1795000000000 + i, "values": {"t": 20.5, "h": 40.0, "p": 1000.1}}
        assert stream.frames == 3  # one encoding per tick for both clients
        await c1.close()
        await c2.close()
        assert await wait_until(lambda: stream.clients == [])
    serve(t)


def test_subscribe_narrows_fields_and_rate():
    async def t(stream, port):
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        await c.send(json.dumps({"type": "subscribe", "fields": ["t"], "rate_hz": 0.01}))
        ack = await c.recv_json()
        assert ack == {"type": "subscribed", "fields": ["t"], "rate_hz": 0.01}
        for i in range(1, 6):
            stream.publish(snap(i))
            await asyncio.sleep(0)
        f = await c.recv_json()
        assert f["values"] == {"t": 20.5} and f["seq"] == 1
        # the next frame this client gets is not seq 2-5: its rate allows one per 100 s
        await c.send(json.dumps({"type": "subscribe", "rate_hz": 50}))
        ack = await c.recv_json()
        assert ack["type"] == "subscribed" and ack["rate_hz"] == 50
        stream.publish(snap(6))
        f = await c.recv_json()
        assert f["seq"] == 6 and f["values"] == {"t": 20.5}
        await c.close()
    serve(t)


def test_bad_subscribe_gets_error_frame_and_stays_open():
    async def t(stream, port):
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        await c.send(json.dumps({"type": "subscribe", "fields": ["t", "nope"]}))
        assert await c.recv_json() == {"type": "error", "error": "unknown fields: nope"}
        await c.send(json.dumps({"type": "subscribe", "rate_hz": 1000}))
        e = await c.recv_json()
        assert e["type"] == "error" and "rate_hz" in e["error"]
        stream.publish(snap(1))
        f = await c.recv_json()
        assert sorted(f["values"]) == ["h", "p", "t"]
        await c.close()
    serve(t)


def test_unknown_message_type_and_bad_json_close_1003():
    async def t(stream, port):
        for msg in (json.dumps({"type": "launch"}), "{not json"):
            c = (await wc.ws_connect(port, token=token("viewer")))[2]
            await c.send(msg)
            op, data = await c.recv()
            assert op == 8 and (data[0] << 8 | data[1]) == 1003
            op, data = await c.recv()
            assert op is None  # and the server closed the socket
            await c.close()
        assert await wait_until(lambda: stream.clients == [])
    serve(t)


def test_message_flood_closes_1008_and_oversize_1009():
    async def t(stream, port):
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        sub = json.dumps({"type": "subscribe", "rate_hz": 1})
        code = None
        for _ in range(stream.max_msg_burst + 3):
            await c.send(sub)
        while True:
            op, data = await c.recv()
            if op is None:
                break
            if op == 8:
                code = data[0] << 8 | data[1]
        assert code == 1008
        await c.close()
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        await c.send("x" * (stream.max_message + 1))
        op, data = await c.recv()
        assert op == 8 and (data[0] << 8 | data[1]) == 1009
        await c.close()
    serve(t)


def test_client_cap_503_before_upgrade():
    async def t(stream, port):
        cs = []
        for _ in range(stream.max_clients):
            s, h, c = await wc.ws_connect(port, token=token("viewer"))
            assert s == 101
            cs.append(c)
        s, h, body = await wc.ws_connect(port, token=token("viewer"))
        assert s == 503 and body["error"].startswith("too many stream clients") and h["retry-after"] == "5"
        for c in cs:
            await c.close()
    serve(t, max_connections=5)


def test_slow_client_dropped_others_keep_streaming():
    async def t(stream, port):
        stream.send_timeout_s = 0.1
        fast = (await wc.ws_connect(port, token=token("viewer")))[2]
        slow = (await wc.ws_connect(port, token=token("viewer")))[2]
        assert await wait_until(lambda: len(stream.clients) == 2)
        stuck = stream.clients[1]

        class Stuck:  # a peer whose TCP window never opens: every write hangs
            async def awrite(self, data):
                await asyncio.sleep(3600)

            async def aclose(self):
                await stuck_writer.aclose()
        stuck_writer = stuck.writer
        stuck.writer = Stuck()
        for i in range(1, 4):
            stream.publish(snap(i))
            got = await fast.recv_json()
            assert got["seq"] == i
        assert await wait_until(lambda: len(stream.clients) == 1)
        assert stuck.dropped == "send timed out" and stream.dropped == 1
        # queue overflow drops too (frames published faster than a client takes them)
        for i in range(4, 4 + stream.max_queue + 1):
            stream.publish(snap(i))
        assert stream.dropped == 2 and stream.clients[0].dropped == "send queue full"
        await fast.close()
        await slow.close()
    serve(t)


def test_ping_pong_and_silent_client_dropped():
    async def t(stream, port):
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        await c.send(b"hi", opcode=9)
        op, data = await c.recv()
        assert op == 10 and data == b"hi"
        await c.close()
        assert await wait_until(lambda: stream.clients == [] and stream._pinger is None)
        stream.ping_interval_s = 0.05  # the pinger stopped with the last client: the next one starts at this interval
        c = (await wc.ws_connect(port, token=token("viewer")))[2]
        seen = []
        while True:
            op, data = await c.recv()
            seen.append(op)
            if op is None or op == 8:
                break
        assert 9 in seen and seen[-1] == 8  # pinged, never answered, closed (1001)
        assert (data[0] << 8 | data[1]) == 1001
        await c.close()
    serve(t)


def test_accept_key_rfc6455_and_non_upgrade_400():
    from iotlib.wsstream import _accept_key

    class R:
        headers = {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Connection": "keep-alive, Upgrade",
                   "Upgrade": "websocket"}
    assert _accept_key(R()) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3 example

    async def t(stream, port):
        s, h, b = await wc.request(port, "GET", "/ws", token=token("viewer"))
        assert s == 400 and b == {"error": "not a WebSocket upgrade request"}
    serve(t)


def test_a_session_is_detached_from_its_request():
    # A stream session lasts minutes; the request that opened it (headers, URL and query with the token) and the
    # frames that dispatched it are let go once the upgrade is done, so 3 clients fit a Pico-sized heap. The
    # connection keeps its place under max_connections until the session ends.
    async def t(stream, port):
        seen = []
        check = stream.web.check

        def spy(req, role):
            seen.append(req)
            return check(req, role)
        stream.web.check = spy
        c = (await wc.ws_connect(port, "/ws?token=" + token("viewer")))[2]
        assert await wait_until(lambda: len(stream.clients) == 1)
        assert seen[-1].sock is None and stream.web.active == 1
        stream.publish(snap(1))
        assert (await c.recv_json())["seq"] == 1  # the session goes on without its request
        await c.close()
        assert await wait_until(lambda: stream.clients == [] and stream.web.active == 0)
    serve(t)


def test_a_stream_client_costs_little_heap():
    # Each connected client's heap on MicroPython: its state, its two tasks and the socket (and here the test's own
    # client end, in the same process). Attached to the request that opened it, with a timed wait in each sender, it
    # was 5.6K on the unix port; detached 2.5K.
    import gc
    if not hasattr(gc, "mem_alloc"):
        return  # CPython: no GC heap to measure

    async def t(stream, port):
        cs = []
        used = []
        for _ in range(3):
            cs.append((await wc.ws_connect(port, token=token("viewer")))[2])
            assert await wait_until(lambda: len(stream.clients) == len(cs))
            await asyncio.sleep(0.05)
            gc.collect()
            used.append(gc.mem_alloc())
        for c in cs:
            await c.close()
        per_client = (used[2] - used[0]) // 2
        assert per_client < 3000, per_client
    serve(t, max_connections=5)
