"""Metering: a request's candidates are reserved, then committed or released, as one ``with``.

    with metering.charge(key, plan.population, request_id, fingerprint) as bill:
        ...forward...
        bill.image_forwards = n      # committed when the block ends normally, released if it raises
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bptvlm.shared import protocol as p

from .ledger import KeyRecord, Ledger


@dataclass
class Bill:
    """What the ``with`` block reports for the commit."""

    candidates: int
    image_forwards: int = 0

    @property
    def usage(self) -> p.Usage:
        return p.Usage(candidates=self.candidates, requests=1, image_forwards=self.image_forwards)


class Metering:
    """The one place that moves a key's balance (routes and orchestration read it through here)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @contextmanager
    def charge(self, key: KeyRecord, candidates: int, request_id: str | None = None,
               fingerprint: str = "") -> Iterator[Bill]:
        """Hold ``candidates`` (``BudgetExhaustedError`` charging nothing if they are not left); commit them
        when the block succeeds, release them when it raises."""
        reservation = self.ledger.reserve(key, candidates)
        bill = Bill(candidates)
        try:
            yield bill
        except BaseException:
            self.ledger.release(reservation)
            raise
        self.ledger.commit(reservation, bill.image_forwards, request_id, fingerprint)

    def answered(self, key: KeyRecord, request_id: str, within_s: float) -> tuple[str, int] | None:
        """(fingerprint, candidates) of this key's request id if it was charged within ``within_s`` seconds."""
        return self.ledger.answered(key, request_id, within_s)

    def report(self, key: KeyRecord) -> p.UsageReport:
        """What ``key`` has been charged so far and what remains of its quota (None: no quota)."""
        return p.UsageReport(usage=self.ledger.usage(key), remaining=self.ledger.remaining(key))
