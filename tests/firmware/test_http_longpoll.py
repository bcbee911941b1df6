# The long-poll's yield: one connection shared by a held request and everything else the device has to send.
import fwtest
import peers
from peers import asyncio
from iotlib.http import HTTPClient, Yielded


def test_a_long_poll_gives_the_connection_up_to_the_next_request():
    async def go():
        log = []
        closed = []

        async def handler(reader, writer):
            try:
                req = await peers.read_request(reader)
                log.append(req[1])
                if req[1].startswith("/poll"):  # a long-poll nothing answers: it ends when the client hangs up
                    while await reader.read(64):
                        pass
                    closed.append(req[1])
                else:
                    if req[1] == "/slow":
                        await asyncio.sleep(0.2)
                    writer.write(peers.response(200, {"path": req[1]}))
                    await writer.drain()
            finally:
                await peers.close(writer)
        srv, port = await peers.serve(handler)
        base = "http://127.0.0.1:%d" % port
        c = HTTPClient(timeout_ms=5000)
        try:
            poll = asyncio.create_task(c.request("POST", base + "/poll?wait=30", json={}, timeout_ms=30000,
                                                 yieldable=True))
            for _ in range(100):  # until the poll is on the wire
                if log:
                    break
                await asyncio.sleep(0.01)
            r = await c.request("POST", base + "/report", json={"a": 1})  # does not wait out the poll
            assert r.status == 200 and r.json() == {"path": "/report"}
            try:
                await poll
                raise AssertionError("the poll must give way")
            except Yielded:
                pass
            assert c.yields == 1 and c.failures == 0
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.01)
            assert closed == ["/poll?wait=30"], "the poll's connection is closed: one connection at a time"
            # a poll that finds a request already waiting for the connection when it gets it lets that go first
            slow = asyncio.create_task(c.request("GET", base + "/slow"))
            await asyncio.sleep(0)
            poll2 = asyncio.create_task(c.request("POST", base + "/poll2", yieldable=True))
            await asyncio.sleep(0)
            after = asyncio.create_task(c.request("GET", base + "/after"))
            assert (await slow).status == 200
            try:
                await poll2
                raise AssertionError("the poll must let the waiting request go first")
            except Yielded:
                pass
            assert (await after).status == 200 and "/poll2" not in log
            # without anyone waiting, a yieldable request is an ordinary one
            r3 = await c.request("GET", base + "/b", yieldable=True)
            assert r3.status == 200 and c.failures == 0
        finally:
            await peers.stop(srv)
    fwtest.run(go())
