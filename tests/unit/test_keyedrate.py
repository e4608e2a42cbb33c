"""The per-key rate limiter: plain numbers for the clock."""

from __future__ import annotations

import os
import random

import pytest

from linechatd.keyedrate import KeyedRateLimiter, retry_after_s


def test_each_key_has_its_own_burst_then_its_rate() -> None:
    limiter = KeyedRateLimiter(rate=2.0, burst=3, max_keys=10)
    assert [limiter.acquire("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", 0.0) == pytest.approx(0.5)
    # Another key is not affected.
    assert limiter.acquire("b", 0.0) == 0.0
    # Half a second later one token is back for "a", and only one.
    assert limiter.acquire("a", 0.5) == 0.0
    assert limiter.acquire("a", 0.5) == pytest.approx(0.5)
    stats = limiter.statistics()
    assert (stats.allowed, stats.refused) == (5, 2)


def test_refused_attempts_cost_nothing() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1, max_keys=10)
    assert limiter.acquire("a", 0.0) == 0.0
    for t in (0.1, 0.5, 0.9):
        assert limiter.acquire("a", t) == pytest.approx(1.0 - t)
    assert limiter.acquire("a", 1.0) == 0.0


def test_refilled_keys_are_forgotten() -> None:
    limiter = KeyedRateLimiter(rate=10.0, burst=5, max_keys=1000)
    for i in range(100):
        limiter.acquire(f"k{i}", 0.0)
    assert limiter.statistics().keys == 100
    # 0.5 s refills every bucket (one token taken, 10/s): the next call forgets them all.
    limiter.acquire("new", 0.5)
    assert limiter.statistics().keys == 1
    assert limiter.statistics().evicted == 0


def test_memory_is_bounded_under_a_flood_of_keys() -> None:
    limiter = KeyedRateLimiter(rate=0.001, burst=1, max_keys=50)
    # The throttled key, then a flood of new ones at the same instant (nothing refills).
    assert limiter.acquire("victim-of-its-own-flood", 0.0) == 0.0
    assert limiter.acquire("victim-of-its-own-flood", 0.0) > 0.0
    for i in range(10_000):
        limiter.acquire(f"flood{i}", 0.0)
        assert limiter.statistics().keys <= 50
    stats = limiter.statistics()
    assert stats.keys == 50 and stats.evicted == 10_000 + 1 - 50


def test_a_key_in_use_stays_while_others_come_and_go() -> None:
    # Least recently used goes first: a key that keeps asking is never the one dropped.
    limiter = KeyedRateLimiter(rate=0.001, burst=2, max_keys=3)
    limiter.acquire("busy", 0.0)
    limiter.acquire("busy", 0.0)
    for i in range(20):
        limiter.acquire(f"other{i}", 0.0)
        assert limiter.acquire("busy", 0.0) > 0.0  # still throttled: remembered


def test_reconfigure_applies_to_existing_keys() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=2, max_keys=10)
    limiter.acquire("a", 0.0)
    limiter.acquire("a", 0.0)
    limiter.reconfigure(rate=10.0, burst=2)
    assert limiter.acquire("a", 0.1) == 0.0


@pytest.mark.parametrize(("wait", "header"), [(0.01, 1), (1.0, 1), (1.2, 2), (59.5, 60)])
def test_retry_after_is_whole_seconds_at_least_one(wait: float, header: int) -> None:
    assert retry_after_s(wait) == header


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate=0.0, burst=1, max_keys=1)
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate=1.0, burst=0, max_keys=1)
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate=1.0, burst=1, max_keys=0)


def test_randomised_against_a_bucket_per_key() -> None:
    """With room for every key, the limiter answers like one independent bucket per key."""
    seed = int(os.environ.get("LINECHAT_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (LINECHAT_TEST_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    rate, burst = 3.0, 4
    limiter = KeyedRateLimiter(rate=rate, burst=burst, max_keys=100)
    model: dict[str, tuple[float, float]] = {}
    now = 0.0
    for _ in range(5000):
        now += rng.choice([0.0, 0.0, 0.01, 0.1, 0.4, 2.0])
        key = f"k{rng.randrange(8)}"
        tokens, last = model.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        expect_allowed = tokens >= 1.0 - 1e-9
        model[key] = (tokens - 1.0 if expect_allowed else tokens, now)
        assert (limiter.acquire(key, now) == 0.0) is expect_allowed, (seed, now, key)
