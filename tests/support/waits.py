"""Bounded polling and the server's /metrics: synchronisation aids, never timing assertions."""
from __future__ import annotations

import re
import time
from typing import Any, Callable

import httpx


def wait_until(pred: Callable[[], Any], timeout: float = 30, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll pred until it returns a true value, which is returned; fails the test if it never does within timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def metric(client: httpx.Client, name: str, labels: str = "", **by_label) -> float:
    """One sample of the server's /metrics, 0.0 when absent. Labels either as rendered (`'kind="heartbeat"'`) or as
    keywords in the order the server renders them (`kind="heartbeat"`)."""
    want = labels or ",".join(f'{k}="{v}"' for k, v in by_label.items())
    pat = re.compile("^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$", re.M)
    m = pat.search(client.get("/metrics").text)
    return float(m.group(1)) if m else 0.0
