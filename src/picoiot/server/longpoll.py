"""Blocking queries (Consul semantics) on top of the notifier."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

from .notifier import topic

if TYPE_CHECKING:
    from .core import ControlPlane

T = TypeVar("T")


async def wait_for_change(cp: "ControlPlane", ns: str, dev: str, wait_s: float, kind: str,
                          fetch: Callable[[], Awaitable[T]], changed: Callable[[T], bool]) -> T:
    """Fetch now; if not `changed`, wait for the device's events until it is or `wait_s` passes; return the last fetch.

    The event flag is cleared *before* each fetch, so a change committed between the fetch and the wait still wakes us.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, wait_s)
    gauge = cp.metrics.longpolls.labels(kind)
    with cp.notifier.subscribe(topic(ns, dev)) as sub:
        waiting = False
        try:
            while True:
                sub.event.clear()
                cur = await fetch()
                remaining = deadline - loop.time()
                if changed(cur) or remaining <= 0 or cp.notifier.draining:
                    return cur
                if not waiting:
                    gauge.inc()
                    waiting = True
                await sub.wait(remaining)
        finally:
            if waiting:
                gauge.dec()


def parse_etag(value: str | None) -> int | None:
    if not value:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    try:
        return int(v)
    except ValueError:
        return None
