"""Who gets the model next: a bounded queue in front of the one device, and per-key rate limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from bptvlm.shared.errors import GatewayTimeoutError, NotReadyError, RateLimitedError


T = TypeVar("T")


class OverloadedError(NotReadyError):
    """The queue is full (503 + Retry-After): the server is busy, not broken."""


class Admission:
    """At most one forward at a time; at most ``max_queue`` requests waiting, each at most ``timeout`` s.

    A full queue answers at once (503 + Retry-After) instead of letting latency grow without bound.
    Two gates: ``admit()`` on the event loop, before a request reads its body or takes a thread (one
    on the device plus ``max_queue`` admitted), and ``slot()`` in the worker thread around the device
    work itself (preprocessing included). ``run()`` gives admitted requests threads of their own, so
    health routes and the auth dependencies never wait behind requests queued for the model.
    """

    def __init__(self, max_queue: int, timeout: float) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self._device = threading.Lock()
        self._state = threading.Lock()
        self.waiting = 0  # threads waiting in slot()
        self.admitted = 0  # requests between admit() and their answer
        self._running_admitted = 0  # 1 while an admitted request holds the device (not a probe)
        self._local = threading.local()  # .admitted: this worker thread runs an admitted request
        self._threads: anyio.CapacityLimiter | None = None

    @property
    def queued(self) -> int:
        """Admitted requests not on the device."""
        return self.admitted - self._running_admitted

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request in for the ``with`` body, or refuse it at once (503) when the queue is full."""
        with self._state:
            if self.queued >= self.max_queue:
                raise OverloadedError(f"server overloaded: {self.queued} requests are queued; retry later", 1.0)
            self.admitted += 1
        try:
            yield
        finally:
            with self._state:
                self.admitted -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread reserved for admitted requests (not anyio's shared pool)."""
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(self.max_queue + 2)

        def admitted() -> T:
            self._local.admitted = True
            try:
                return fn(*args)
            finally:
                self._local.admitted = False

        return await anyio.to_thread.run_sync(admitted, limiter=self._threads)

    @contextmanager
    def slot(self) -> Iterator[float]:
        """Hold the device for the ``with`` body; yields the seconds spent waiting."""
        with self._state:
            if self.waiting >= self.max_queue:
                raise OverloadedError(f"server overloaded: {self.waiting} requests are queued; retry later", 1.0)
            self.waiting += 1
        start = time.monotonic()
        try:
            acquired = self._device.acquire(timeout=self.timeout)
        finally:
            with self._state:
                self.waiting -= 1
        waited = time.monotonic() - start
        if not acquired:
            raise GatewayTimeoutError(f"the request waited {waited:.1f} s for the model (limit {self.timeout:g} s)")
        mine = getattr(self._local, "admitted", False)
        with self._state:
            self._running_admitted += mine
        try:
            yield waited
        finally:
            with self._state:
                self._running_admitted -= mine
            self._device.release()


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class RateState:
    limit: int
    remaining: int
    reset_s: float

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": f"{self.reset_s:.0f}"}


class RateLimiter:
    """Token buckets per key: ``per_minute`` requests, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key_id: int, per_minute: int) -> RateState:
        """Spend one request of ``key_id``; raise ``RateLimitedError`` (with Retry-After) if none is left."""
        now = time.monotonic()
        rate = per_minute / 60.0
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(float(per_minute), now))
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / rate if rate > 0 else 60.0
                raise RateLimitedError(f"rate limit: {per_minute} requests per minute for this key", wait)
            bucket.tokens -= 1.0
            return RateState(per_minute, int(bucket.tokens), (per_minute - bucket.tokens) / rate if rate else 0.0)
