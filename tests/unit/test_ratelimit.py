"""The rate limiter and the bad-frame counter: pure logic, the clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linechatd.ratelimit import StrikeCounter, TokenBucket, UidBuckets


def test_a_full_bucket_allows_a_burst_then_refuses() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.allow(0.0) for _ in range(6)] == [True] * 5 + [False]


def test_tokens_come_back_at_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    for _ in range(5):
        assert bucket.allow(0.0)
    assert not bucket.allow(0.05)  # half a token
    assert bucket.allow(0.1)  # one token
    assert not bucket.allow(0.1)
    assert [bucket.allow(0.3) for _ in range(3)] == [True, True, False]


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=3, now=0.0)
    # An hour idle refills to the burst, not to 360 000 tokens.
    assert [bucket.allow(3600.0) for _ in range(4)] == [True, True, True, False]


def test_refused_attempts_do_not_cost_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert bucket.allow(0.0)
    for t in (0.1, 0.2, 0.5, 0.9):
        assert not bucket.allow(t)
    assert bucket.allow(1.0)


def test_a_slow_steady_sender_is_never_refused() -> None:
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert all(bucket.allow(0.5 * i) for i in range(1000))


@given(
    rate=st.floats(min_value=0.1, max_value=1000.0),
    burst=st.integers(min_value=1, max_value=500),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), max_size=200),
)
def test_allowed_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.allow(now)
    assert allowed <= burst + rate * now + 1e-6


def test_strikes_pass_the_limit_on_the_one_after_it() -> None:
    counter = StrikeCounter(limit=3)
    assert [counter.strike(float(t)) for t in range(5)] == [False, False, False, True, True]


def test_strikes_older_than_the_window_are_forgotten() -> None:
    counter = StrikeCounter(limit=2, window_s=60.0)
    assert not counter.strike(0.0)
    assert not counter.strike(30.0)
    # At 61 the strike from 0 has left the window: 2 in it, not 3.
    assert not counter.strike(61.0)
    assert counter.strike(62.0)  # 30, 61, 62


def test_a_strike_exactly_one_window_old_still_counts() -> None:
    counter = StrikeCounter(limit=1, window_s=10.0)
    assert not counter.strike(0.0)
    assert counter.strike(10.0)


def test_limit_zero_tolerates_nothing() -> None:
    counter = StrikeCounter(limit=0)
    assert counter.strike(0.0)


def test_a_steady_trickle_below_the_rate_is_tolerated_forever() -> None:
    # Ten bad frames a minute is the default limit: one every 7 s never trips it.
    counter = StrikeCounter(limit=10)
    assert not any(counter.strike(7.0 * i) for i in range(10_000))


def test_the_counter_keeps_bounded_memory() -> None:
    counter = StrikeCounter(limit=5)
    for i in range(100_000):
        counter.strike(i * 0.0001)
    assert len(counter._times) <= 6


@pytest.mark.parametrize("limit", [1, 10, 100])
def test_a_burst_of_exactly_the_limit_is_tolerated(limit: int) -> None:
    counter = StrikeCounter(limit=limit)
    assert not any(counter.strike(0.0) for _ in range(limit))
    assert counter.strike(0.0)


def test_a_uid_keeps_its_bucket_across_devices_and_reconnects() -> None:
    buckets = UidBuckets(rate=1.0, burst=3)
    first = buckets.bucket("alice", 0.0)
    assert [first.allow(0.0) for _ in range(4)] == [True, True, True, False]
    # A second device, or the same one reconnecting: the same, spent bucket.
    again = buckets.bucket("alice", 0.5)
    assert again is first and not again.allow(0.5)
    assert buckets.bucket("bob", 0.5).allow(0.5)


def test_uid_buckets_are_bounded_and_forget_only_what_changes_nothing() -> None:
    buckets = UidBuckets(rate=1.0, burst=2, max_uids=3)
    for uid in ("a", "b", "c"):
        assert buckets.bucket(uid, 0.0).allow(0.0)
    # At 10 s every bucket has refilled: the sweep forgets them, nothing is lost.
    buckets.bucket("d", 10.0)
    assert len(buckets) == 1
    # Buckets still spending are kept while full ones go.
    spent = buckets.bucket("e", 10.0)
    spent.allow(10.0)
    spent.allow(10.0)
    buckets.bucket("f", 10.0)
    buckets.bucket("g", 20.0)  # "d" and "f" refilled; "e" too by now (2 tokens at 1/s)
    assert len(buckets) <= 3
    assert buckets.bucket("g", 20.0) is not None
    # When nothing has refilled, the least recently used go: memory stays bounded.
    crowded = UidBuckets(rate=0.001, burst=1, max_uids=10)
    for n in range(1000):
        crowded.bucket(f"u{n}", float(n)).allow(float(n))
        assert len(crowded) <= 10
