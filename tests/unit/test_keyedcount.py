"""Counts per key with a release that counts once (keyedcount.KeyedCounter)."""

from __future__ import annotations

from linechatd.keyedcount import KeyedCounter


def test_counts_per_key_and_in_total_and_each_release_counts_once() -> None:
    held: KeyedCounter[str] = KeyedCounter()
    first, second, other = held.add("a"), held.add("a"), held.add("b")
    assert (held.total, held.of("a"), held.of("b"), held.of("c")) == (3, 2, 1, 0)
    first()
    first()  # a second call gives nothing back twice
    assert (held.total, held.of("a")) == (2, 1)
    second()
    other()
    assert held.total == 0 and held.of("a") == 0
    assert held._by_key == {}  # keys none are held for are forgotten
