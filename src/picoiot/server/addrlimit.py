"""A token bucket per client address, for the unauthenticated endpoints that write (registration challenges).

Each challenge costs a signed nonce (server/nonces.py) and each answer a used-nonce row; without a bound one address
could keep the server signing as fast as it can send. A device
asks for one challenge per registration, so a burst covers a fleet behind one NAT starting together, and the refill
rate its steady re-registrations. Per process (several workers each keep their own buckets), in memory: losing the
buckets on a restart only forgives a client.
"""
from __future__ import annotations

import time


class AddressLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_addresses: int = 10_000):
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, monotonic time of that count)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, address: str) -> float:
        """0 if `address` may go on (one token taken), else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        tokens, then = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return (1 - tokens) / self.rate
        if address not in self._buckets and len(self._buckets) >= self.max_addresses:
            self._prune(now)
        self._buckets[address] = (tokens - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        # full buckets carry no information; if every bucket is still draining, forget the oldest half
        full = [a for a, (t, ts) in self._buckets.items() if t + (now - ts) * self.rate >= self.burst]
        for a in full:
            del self._buckets[a]
        if len(self._buckets) >= self.max_addresses:
            for a in sorted(self._buckets, key=lambda a: self._buckets[a][1])[:len(self._buckets) // 2]:
                del self._buckets[a]
