"""Per-key query metering: what each API key has been charged, and its quota.

A request is checked against the quota before it runs and charged after it succeeded, under one
lock, so it is either fully charged and answered or not charged at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bptvlm.shared.errors import BudgetExhaustedError
from bptvlm.shared.protocol import Usage


class UsageMeter:
    """In-memory ledger: key -> Usage. ``quota`` caps candidates per key (None = unlimited)."""

    def __init__(self, quota: int | None = None) -> None:
        self.quota = quota
        self._usage: dict[str, Usage] = {}
        self._lock = threading.Lock()

    def usage(self, key: str) -> Usage:
        with self._lock:
            return self._usage.get(key, Usage()).model_copy()

    def remaining(self, key: str) -> int | None:
        if self.quota is None:
            return None
        return max(0, self.quota - self.usage(key).candidates)

    @contextmanager
    def charge(self, key: str, candidates: int) -> Iterator[Usage]:
        """Reserve ``candidates`` for the body of the ``with``; commit them only if it succeeds.

        The caller fills ``image_forwards`` of the yielded Usage; it is added to the key's total.
        """
        with self._lock:
            used = self._usage.get(key, Usage())
            if self.quota is not None and used.candidates + candidates > self.quota:
                left = self.quota - used.candidates
                raise BudgetExhaustedError(
                    f"query budget exhausted: this request needs {candidates} candidates, "
                    f"{left} of the key's {self.quota} remain"
                )
            # Reserve now so that concurrent requests cannot overdraw the quota together.
            self._usage[key] = used.model_copy(update={"candidates": used.candidates + candidates})
        charged = Usage(candidates=candidates, requests=1)
        try:
            yield charged
        except BaseException:
            with self._lock:
                now = self._usage[key]
                self._usage[key] = now.model_copy(update={"candidates": now.candidates - candidates})
            raise
        with self._lock:
            now = self._usage[key]
            self._usage[key] = Usage(
                candidates=now.candidates,
                requests=now.requests + 1,
                image_forwards=now.image_forwards + charged.image_forwards,
            )
