"""A thread-safe, byte-capped LRU: the one cache behind uploaded images, token ids, features and replies."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def text_bytes(texts: tuple[str, ...]) -> int:
    """What a tuple of strings costs as a key: its characters (up to 4 bytes each) and per-object overhead."""
    return sum(len(t) * 4 + 64 for t in texts) + 64


class ByteLRU(Generic[K, V]):
    """Evicts least recently used entries once their sizes pass ``capacity_bytes``.

    An entry's size is ``sizeof(value) + keysize(key)``, measured when it is stored (and again by
    ``trim`` after it grew in place). An entry alone over the cap is never kept: ``put`` returns False.
    """

    def __init__(
        self, capacity_bytes: int, sizeof: Callable[[V], int], keysize: Callable[[K], int] | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self._sizeof = sizeof
        self._keysize = keysize or (lambda key: 0)
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._total = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found[0]

    def fits(self, value: V, key: K) -> bool:
        """Whether an entry of this size could be kept at all."""
        return self._sizeof(value) + self._keysize(key) <= self.capacity_bytes

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` (replacing what ``key`` held); False when it alone is over the cap (not stored)."""
        size = self._sizeof(value) + self._keysize(key)
        with self._lock:
            self._drop(key)
            if size > self.capacity_bytes:
                return False
            self._items[key] = (value, size)
            self._total += size
            self._trim()
            return True

    def put_if_absent(self, key: K, value: V) -> V | None:
        """Store ``value`` unless ``key`` is there already; return what is stored (first writer wins),
        or None when ``value`` alone is over the cap."""
        size = self._sizeof(value) + self._keysize(key)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found[0]
            if size > self.capacity_bytes:
                return None
            self._items[key] = (value, size)
            self._total += size
            self._trim()
            return value

    def trim(self, key: K | None = None) -> None:
        """Measure ``key``'s entry again after it grew in place (dropping it if now alone over the cap),
        then evict past the cap."""
        with self._lock:
            found = self._items.get(key) if key is not None else None
            if found is not None:
                size = self._sizeof(found[0]) + self._keysize(key)  # type: ignore[arg-type]
                self._total += size - found[1]
                self._items[key] = (found[0], size)  # type: ignore[index]
                if size > self.capacity_bytes:
                    self._drop(key)  # type: ignore[arg-type]
            self._trim()

    def _drop(self, key: K) -> None:
        found = self._items.pop(key, None)
        if found is not None:
            self._total -= found[1]

    def _trim(self) -> None:
        while self._items and self._total > self.capacity_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self._total -= size

    @property
    def nbytes(self) -> int:
        return self._total

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
