"""Metrics (Prometheus text at ``/metrics``) and structured JSON logs with request ids."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Give every request an id (the client's X-Request-ID, or a new one), count and log it."""
    request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
    request.state.request_id = request_id
    start = time.perf_counter()
    response = await call_next(request)
    elapsed = time.perf_counter() - start
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")
    request.app.state.metrics.requests.labels(path, str(response.status_code)).inc()
    response.headers[REQUEST_ID] = request_id
    log.info("%s %s %d", request.method, request.url.path, response.status_code,
             extra={"request_id": request_id, "method": request.method, "path": request.url.path,
                    "status": response.status_code, "duration_ms": round(elapsed * 1000, 2)})
    return response
