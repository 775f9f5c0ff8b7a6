"""Metrics (Prometheus text at ``/metrics``) and structured JSON logs with request ids."""

from __future__ import annotations

import json
import logging
import time
import uuid
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = "X-Request-ID"
log = logging.getLogger("bptvlm.access")


class Metrics:
    """Registries per app, so several apps in one process (tests) do not collide. ``tenants`` holds the
    series labelled by key (who uses the service, and how much): shown only to the metrics token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tenants = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bptvlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.candidates_total = Counter("bptvlm_candidates_charged_all", "candidates charged, all keys", registry=r)
        self.candidates = Counter("bptvlm_candidates_charged", "candidates charged, by key", ["key"],
                                  registry=self.tenants)
        self.queue_wait = Histogram("bptvlm_queue_wait_seconds", "time waiting for the model", registry=r,
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
        self.inference = Histogram("bptvlm_inference_seconds", "forward time per request", registry=r,
                                   buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))
        self.queue_depth = Gauge("bptvlm_queue_depth", "requests waiting for the model", registry=r)
        self.cache_hits = Gauge("bptvlm_cache_hits", "cache hits", ["cache"], registry=r)
        self.cache_misses = Gauge("bptvlm_cache_misses", "cache misses", ["cache"], registry=r)

    def charged(self, key: str, candidates: int) -> None:
        self.candidates.labels(key).inc(candidates)
        self.candidates_total.inc(candidates)

    def render(self, tenants: bool = False) -> bytes:
        """Prometheus text; with ``tenants``, the per-key series too."""
        return generate_latest(self.registry) + (generate_latest(self.tenants) if tenants else b"")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for field in ("request_id", "method", "path", "status", "duration_ms", "key"):
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = name != "uvicorn.access"  # our access line replaces uvicorn's


class RequestContext:
    """ASGI middleware: give every request an id (the client's X-Request-ID, or a new one), count and log it.

    Plain ASGI rather than ``@app.middleware("http")``: that form pipes every body chunk through extra
    tasks and streams on the event loop, which under a burst of large bodies delays the health routes.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get(REQUEST_ID) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            path = getattr(scope.get("route"), "path", "unmatched")
            scope["app"].state.metrics.requests.labels(path, str(status)).inc()
            log.info("%s %s %d", scope["method"], scope["path"], status,
                     extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                            "status": status, "duration_ms": round(elapsed * 1000, 2)})
