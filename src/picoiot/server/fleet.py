"""The fleet-operations background tasks of one server process: rollout evaluation + alert rules, and delivery.

They run beside the request handlers on the same event loop but never in a request's path: a slow database round or
a receiver that answers slowly (each attempt is bounded by `alert_timeout_s`) delays only these tasks, never a
heartbeat. Every process runs them; the data parts serialise themselves across processes (rollouts.py, alerting.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from . import alerting, rollouts
from .delivery import Delivery
from .ota import assignments_changed

if TYPE_CHECKING:
    from .core import ControlPlane

log = logging.getLogger("picoiot.server.fleet")


async def evaluate_once(cp: "ControlPlane") -> None:
    s = cp.settings
    for ns in await cp.write(rollouts.tick):
        assignments_changed(cp, ns)  # offers made by the tick reach this process's heartbeat answers at once
    await cp.write(alerting.evaluate, s.alert_group_wait_s, s.alert_resend_s)


async def _loop(cp: "ControlPlane", what: str, fn, period: float, wake: asyncio.Event | None = None) -> None:
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a database hiccup must not end the task
            log.warning("%s failed: %s: %s", what, type(e).__name__, str(e)[:200])
        if wake is None:
            await asyncio.sleep(period)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), period)
            wake.clear()


class Fleet:
    def __init__(self, cp: "ControlPlane"):
        self.cp = cp
        self.delivery = Delivery(cp)
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        s = self.cp.settings
        self.tasks = [asyncio.create_task(_loop(self.cp, "fleet evaluation", lambda: evaluate_once(self.cp),
                                                s.fleet_tick_s)),
                      asyncio.create_task(_loop(self.cp, "alert delivery", self.delivery.round,
                                                min(s.fleet_tick_s, s.alert_retry_first_s)))]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.delivery.close()
