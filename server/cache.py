"""A thread-safe, byte-capped LRU: the one cache behind uploaded images and cached features."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Evicts least recently used entries once their ``sizeof`` sum passes ``capacity_bytes``.

    The newest entry stays even if it alone is over the cap: it is about to be used.
    """

    def __init__(self, capacity_bytes: int, sizeof: Callable[[V], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self._sizeof = sizeof
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._trim()

    def put_if_absent(self, key: K, value: V) -> V:
        """Store ``value`` unless ``key`` is there already; return what is stored (first writer wins)."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
            self._items[key] = value
            self._trim()
            return value

    def trim(self) -> None:
        """Evict past the cap; call after an entry grew in place."""
        with self._lock:
            self._trim()

    def _trim(self) -> None:
        while len(self._items) > 1 and self.nbytes > self.capacity_bytes:
            self._items.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(self._sizeof(v) for v in self._items.values())

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
