"""Things held per key (connections per address, device slots per uid), and in total."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeyedCounter(Generic[K]):
    """How many are held in total and per key; a key none are held for is forgotten."""

    def __init__(self) -> None:
        self.total = 0
        self._by_key: dict[K, int] = {}

    def of(self, key: K) -> int:
        return self._by_key.get(key, 0)

    def add(self, key: K) -> Callable[[], None]:
        """Count one for ``key``; returns its release (idempotent)."""
        self.total += 1
        self._by_key[key] = self._by_key.get(key, 0) + 1
        return _Release(self, key)

    def _remove(self, key: K) -> None:
        self.total -= 1
        left = self._by_key[key] - 1
        if left:
            self._by_key[key] = left
        else:
            del self._by_key[key]


class _Release(Generic[K]):
    """One count's release: an object with slots, not a closure (held by
    every open session, it is a third of the size)."""

    __slots__ = ("_counter", "_key")

    def __init__(self, counter: KeyedCounter[K], key: K) -> None:
        self._counter: KeyedCounter[K] | None = counter
        self._key = key

    def __call__(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter._remove(self._key)
