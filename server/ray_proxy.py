"""Errors that Ray Serve's proxy makes itself, in the contract's shape, and a dead replica's as a retryable 503.

When a replica's actor dies mid-request, Ray's proxy answers ``500 Internal Server Error`` in plain text,
which a V2 client rightly does not retry. The request is safe to send again: a retry carries the same
request id, so the shared ledger answers a request that was already charged without charging it again,
and the dead replica's hold lapses with its lease. So ``ProxyErrors``, a middleware inside the proxy,
turns any error response that no replica made (it lacks ``X-Bptvlm-Replica``) into ``{"error": ...}``,
and a 5xx into ``503`` with ``Retry-After: 1``. Errors from our app pass through untouched.

Ray loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``PROXY_CALLBACK``), read by the proxy's
process: ``ray_engine.start`` sets it before starting a local Ray; a cluster started with ``ray start``
needs it in that command's environment (README "Replicas with Ray Serve"; deploy/rayservice.yaml).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "bptvlm.server.ray_proxy.proxy_middlewares"
_REPLICA_HEADER = b"x-bptvlm-replica"  # == ray_engine.REPLICA_HEADER, lower-cased as ASGI carries it
DIED = ("the replica serving this request stopped before answering; retry it with the same request id (a request "
        "already charged is not charged again)")


def _json(status: int, message: str, retry_after: bool) -> tuple[Message, Message]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class ProxyErrors:
    """ASGI middleware around Ray's proxy (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the start of an error response no replica made
        body: list[bytes] = []
        started = False

        async def rewrite(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if message["status"] >= 400 and _REPLICA_HEADER not in names:
                    held = message
                    return
                started = True
            elif held is not None and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await flush()
                return
            await send(message)

        async def flush() -> None:
            nonlocal started
            assert held is not None
            status = held["status"]
            text = b"".join(body).decode("utf-8", "replace").strip() or "error"
            for out in _json(503, f"{DIED} (Ray's proxy: {status} {text})", True) if status >= 500 \
                    else _json(status, text, status in (429, 503)):
                await send(out)
            started = True

        try:
            await self.app(scope, receive, rewrite)
            if held is not None and not started:
                await flush()
            elif not started:  # Ray's proxy sends nothing when the replica died (the server would say 500)
                for out in _json(503, DIED, True):
                    await send(out)
        except Exception as exc:  # the proxy raised before any response: what would have been a bare 500
            if started:
                raise
            log.warning("Ray's proxy failed a request (%s: %s); answering 503 so it is retried", type(exc).__name__, exc)
            for out in _json(503, f"{DIED} ({type(exc).__name__})", True):
                await send(out)


def proxy_middlewares() -> list[Any]:
    """What Ray's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the middlewares to add."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]
