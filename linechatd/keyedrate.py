"""A token bucket per key (a client address, a uid), in bounded memory; the clock is passed in.

Used where one bucket per socket would not limit anyone, because the client
simply opens another: handshakes per address, resumes per uid. No I/O and no
trio: tests drive it with plain numbers.

Memory: a key whose bucket has refilled to its burst carries no information
(a new bucket would be the same), so it is forgotten. Keys are kept in
least-recently-used order, which puts the refilled ones first; each call
drops those it finds there, and past ``max_keys`` the least recently used key
is dropped whatever its state. A flood of new keys therefore costs at most
``max_keys`` entries; what it can buy is a fresh bucket for keys not seen
for a while, never more than one burst per key.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["KeyedRateLimiter", "RateStatistics", "retry_after_s"]

# As in ratelimit.TokenBucket: refills are float sums.
_EPSILON = 1e-9


def retry_after_s(wait_s: float) -> int:
    """A wait as a Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(wait_s - _EPSILON))


@dataclass(frozen=True, slots=True)
class RateStatistics:
    keys: int  # keys tracked now
    allowed: int
    refused: int
    evicted: int  # keys dropped before their bucket had refilled (memory bound reached)


class KeyedRateLimiter:
    """``rate`` events per second per key on average, bursts of up to ``burst``."""

    __slots__ = ("rate", "burst", "max_keys", "_buckets", "_allowed", "_refused", "_evicted")

    def __init__(self, rate: float, burst: int, *, max_keys: int) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> [tokens, time of the last update], least recently used first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._allowed = 0
        self._refused = 0
        self._evicted = 0

    def reconfigure(self, rate: float, burst: int) -> None:
        """New limits for every key (a reload); buckets keep their tokens, capped at the burst."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, burst

    def acquire(self, key: str, now: float) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until one is due."""
        self._forget_refilled(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens = float(self.burst)
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self._evicted += 1
        else:
            tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            self._buckets.move_to_end(key)
        if tokens >= 1.0 - _EPSILON:
            self._buckets[key] = [tokens - 1.0, now]
            self._allowed += 1
            return 0.0
        self._buckets[key] = [tokens, now]
        self._refused += 1
        return (1.0 - tokens) / self.rate

    def statistics(self) -> RateStatistics:
        return RateStatistics(len(self._buckets), self._allowed, self._refused, self._evicted)

    def _forget_refilled(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key, (tokens, last) = next(iter(buckets.items()))
            if tokens + (now - last) * self.rate < self.burst - _EPSILON:
                return
            del buckets[key]
