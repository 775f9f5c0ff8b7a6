"""Readiness: the server is ready while its latest forward pass succeeded, and a probe keeps that recent.

Every forward reports here: any success turns readiness on; out-of-memory that even one image at a
time cannot avoid turns it off, and so does a failed probe. When no forward has succeeded for
``interval_s`` (an idle server), ``ProbeLoop`` runs the service's probe: a tiny forward through the
same model path, charged to nobody. Other failures of a request do not turn readiness off: they may
be the request's own fault, and one bad request must not take the server out of rotation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Readiness:
    """Thread-safe: the time of the last successful forward and why the server is not ready (or None)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_success = time.monotonic()
        self._reason: str | None = None

    def succeeded(self) -> None:
        with self._lock:
            if self._reason is not None:
                log.warning("ready again: a forward pass succeeded")
            self.last_success, self._reason = time.monotonic(), None

    def failed(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                log.error("not ready: %s", reason)
            self._reason = reason

    @property
    def reason(self) -> str | None:
        """Why the server is not ready; None when it is."""
        return self._reason


class ProbeLoop:
    """A daemon thread that calls ``probe`` whenever no forward succeeded for ``interval_s``
    (after a failed probe: ``interval_s`` after it). ``probe`` reports its outcome to readiness itself."""

    def __init__(self, probe: Callable[[], object], readiness: Readiness, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, received {interval_s}")
        self._probe, self._readiness, self.interval_s = probe, readiness, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-probe", daemon=True)

    def start(self) -> ProbeLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last_probe = float("-inf")
        while True:
            due = max(self._readiness.last_success, last_probe) + self.interval_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            if time.monotonic() - self._readiness.last_success < self.interval_s:
                continue  # a request's forward succeeded meanwhile
            last_probe = time.monotonic()
            try:
                self._probe()
            except Exception as exc:  # recorded by the probe; the loop goes on
                log.debug("readiness probe failed: %s", exc)
