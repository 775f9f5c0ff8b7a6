"""Idempotency: a request id is answered once per key; retries get the same reply, charged nothing.

Replies are kept ``ttl_s`` seconds in a byte-capped cache (an entry over the cap is never kept). A
retry of a request still running waits for its answer instead of running it twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from bptvlm.shared.errors import InvalidTensorError

from .cache import ByteLRU

R = TypeVar("R")
Slot = tuple[int, str]  # (key id, request id)


def check_same_request(request_id: str, first: str, now: str) -> None:
    if first != now:
        raise InvalidTensorError(f"request id {request_id!r} was already used for a different request body")


class Replies(Generic[R]):
    """Answers by (key id, request id). ``outputs(result)`` gives the arrays that size an entry."""

    def __init__(self, capacity_bytes: int, ttl_s: float, wait_s: float,
                 outputs: Callable[[R], dict[str, np.ndarray]]) -> None:
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.cache: ByteLRU[Slot, tuple[R, float, str]] = ByteLRU(
            capacity_bytes, lambda r: sum(a.nbytes for a in outputs(r[0]).values()) + 256,
            lambda slot: len(slot[1]) * 4 + 64,
        )
        self._in_flight: dict[Slot, threading.Event] = {}
        self._lock = threading.Lock()

    def lookup(self, slot: Slot, fingerprint: str) -> R | None:
        """The kept reply of ``slot`` (within its TTL); a different body under the same id is refused."""
        found = self.cache.get(slot)
        if found is None or time.monotonic() - found[1] > self.ttl_s:
            return None
        check_same_request(slot[1], found[2], fingerprint)
        return found[0]

    def once(self, slot: Slot, fingerprint: str, compute: Callable[[], R], replayed: Callable[[R], R]) -> R:
        """``replayed(kept)`` if ``slot`` was answered, else ``compute()`` (one at a time per slot), kept."""
        while True:
            kept = self.lookup(slot, fingerprint)
            if kept is not None:
                return replayed(kept)
            with self._lock:
                event = self._in_flight.get(slot)
                if event is None:
                    self._in_flight[slot] = threading.Event()
                    break
            event.wait(self.wait_s)  # the same request is running: wait for its answer
        try:
            result = compute()
            self.cache.put(slot, (result, time.monotonic(), fingerprint))
            return result
        finally:
            with self._lock:
                self._in_flight.pop(slot).set()
