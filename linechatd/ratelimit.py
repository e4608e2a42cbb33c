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

    @property
    def last(self) -> float:
        """When tokens were last taken or counted."""
        return self._last

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
        # Made at the first strike: an empty deque weighs about 770 bytes, and
        # every session holds two counters that mostly never strike.
        self._times: deque[float] | None = None

    def strike(self, now: float) -> bool:
        """Record one strike; True once more than ``limit`` fell inside the window."""
        times = self._times
        if times is None:
            times = self._times = deque(maxlen=self.limit + 1)
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) > self.limit


class UidBuckets:
    """One send bucket per uid, shared by its devices and kept across reconnects.

    Bounded: past ``max_uids`` buckets, those that have refilled completely
    are forgotten (a full bucket is what a new one would be, so forgetting it
    loses nothing); if none has, the oldest go. A reconnect therefore never
    buys a fresh allowance while its bucket still remembers spending.
    """

    __slots__ = ("rate", "burst", "max_uids", "_buckets")

    def __init__(self, rate: float, burst: int, *, max_uids: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_uids = max_uids
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, uid: str, now: float) -> TokenBucket:
        """``uid``'s bucket (a full one if it has none), most recently used last."""
        bucket = self._buckets.pop(uid, None)
        if bucket is None:
            if len(self._buckets) >= self.max_uids:
                self._sweep(now)
            bucket = TokenBucket(self.rate, self.burst, now)
        self._buckets[uid] = bucket
        return bucket

    def _sweep(self, now: float) -> None:
        refill_s = self.burst / self.rate
        full = [uid for uid, b in self._buckets.items() if now - b.last >= refill_s]
        for uid in full:
            del self._buckets[uid]
        # Still full: drop the least recently used tenth.
        excess = len(self._buckets) - self.max_uids + 1
        if excess > 0:
            for uid in list(self._buckets)[: max(excess, self.max_uids // 10)]:
                del self._buckets[uid]
