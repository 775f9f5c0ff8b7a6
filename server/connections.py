"""Slow clients: a deadline for each request's headers and a cap on open connections.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and the header size (h11's
``max_incomplete_event_size``), but a client that trickles its headers, one byte every few seconds,
keeps its connection (and a descriptor) forever: every byte restarts nothing because no timer runs
before a request starts. ``DeadlineH11Protocol`` arms one when a connection opens and after every
response, and closes the connection if the next request's headers are not complete in time; it
also closes new connections at once past ``max_connections``. The body's own deadline is
``bodies.read_body``'s (408).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings

log = logging.getLogger(__name__)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (class attributes, see ``protocol_for``)."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("refusing a connection: %d are open (max_connections)", len(self.connections) - 1)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()  # type: ignore[union-attr]
            self._header_deadline = None

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def handle_events(self) -> None:
        super().handle_events()
        if not self._awaiting_headers():
            self._disarm()  # a request started: its body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._awaiting_headers():
            self._arm()  # the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %.1f s", self.header_timeout_s)
            self.transport.close()


def protocol_for(settings: Settings) -> type[DeadlineH11Protocol]:
    """A ``DeadlineH11Protocol`` subclass with the deadline and cap of ``settings``."""
    attrs = {"header_timeout_s": settings.header_timeout_s, "max_connections": settings.max_connections}
    return type("ServerH11Protocol", (DeadlineH11Protocol,), attrs)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that bound slow and idle clients."""
    return {
        "http": protocol_for(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": 16 * 1024,  # request line and headers
    }
