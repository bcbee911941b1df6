"""The dashboard's live updates: a namespace's changes as they are committed, fanned out to its open streams.

The hub listens to the notifier (every process gets every change: locally, and from the others through PostgreSQL
LISTEN/NOTIFY) and to telemetry ingestion (readings this process received; the latest values are not sent across
processes), and fans them out to one bounded queue per open stream. A stream that falls behind gets a `resync`
(the page re-reads everything) instead of an unbounded queue. The stream itself is served by events_api.py.
"""
from __future__ import annotations

import asyncio

#: kinds a browser is told about (the rest are internal bookkeeping)
KINDS = {"config", "state", "device", "online", "offline", "deleted", "alarm", "telemetry", "resync"}
QUEUE = 256


class EventHub:
    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue]] = {}

    def on_event(self, e: dict) -> None:
        if e.get("kind") == "resync":
            for qs in self._streams.values():
                for q in qs:
                    self._put(q, {"kind": "resync"})
            return
        if e.get("kind") not in KINDS:
            return
        out = {k: v for k, v in e.items() if k in ("ns", "dev", "kind", "version", "name", "values")}
        for q in self._streams.get(e["ns"], ()):
            self._put(q, out)

    def on_telemetry(self, ns: str, dev: str, values: dict) -> None:
        if ns in self._streams:
            self.on_event({"ns": ns, "dev": dev, "kind": "telemetry",
                           "values": {f: [ts, v] for f, (ts, v) in values.items()}})

    @staticmethod
    def _put(q: asyncio.Queue, e: dict) -> None:
        try:
            q.put_nowait(e)
        except asyncio.QueueFull:  # a slow reader: drop what it has not read, tell it to re-read everything
            while not q.empty():
                q.get_nowait()
            q.put_nowait({"kind": "resync"})

    def open(self, ns: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self._streams.setdefault(ns, set()).add(q)
        return q

    def close(self, ns: str, q: asyncio.Queue) -> None:
        qs = self._streams.get(ns)
        if qs is not None:
            qs.discard(q)
            if not qs:
                del self._streams[ns]

    def __len__(self) -> int:
        return sum(len(qs) for qs in self._streams.values())
