"""Pure rate-limiting logic (no I/O, the clock is passed in)."""

from __future__ import annotations

from collections import deque

# Refills are sums of float products: without a little slack, a sender exactly
# at the rate would sometimes find 0.9999999999 tokens and be refused.
_EPSILON = 1e-9


class TokenBucket:
    """Allows ``rate`` events per second on average, bursts of up to ``burst``."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens -= 1.0
            return True
        return False


class StrikeCounter:
    """Counts strikes in a sliding window; ``strike()`` says when the limit is passed."""

    __slots__ = ("limit", "window_s", "_times")

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=limit + 1)

    def strike(self, now: float) -> bool:
        """Record one strike; True once more than ``limit`` fell inside the window."""
        self._times.append(now)
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        return len(self._times) > self.limit
