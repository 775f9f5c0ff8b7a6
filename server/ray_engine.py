"""``bptvlm serve --engine ray``: the same FastAPI app as N Ray Serve replicas behind Ray's HTTP proxy.

    driver (bptvlm serve)          Ray cluster (local, or --ray-address ADDR / auto)
    ray.init + serve.start  --->   proxy on --host/--port  --->  replica 1: create_app(settings, service)
    serve.run(deployment)                                  \\->  replica N: its own model copy
                                                              all: one ledger, one image depot

Each replica builds its own ``InferenceService`` (one GPU each with ``gpus_per_replica``), opens the one
shared ledger under its own ``replica_id`` (SQLite WAL for one host; Postgres across hosts; in open mode a
SQLite file the driver makes), so quotas are exact across replicas and a dead replica's holds lapse with
its lease. Responses carry ``X-Bptvlm-Replica``. Ray's health check calls ``check_health``, which is our
readiness: a replica whose forward fails is taken out and restarted by Ray, as is one whose actor dies.

Ray is an optional extra (``pip install 'bptvlm[ray]'``); this module imports it only inside functions.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .ray_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

log = logging.getLogger(__name__)

RAY_HINT = "--engine ray needs Ray Serve: pip install 'bptvlm[ray]' (or pip install 'ray[serve]')"
REPLICA_HEADER = "X-Bptvlm-Replica"
APP_NAME = "bptvlm"
NAMESPACE = "bptvlm"


@dataclass(frozen=True)
class RayOptions:
    """How the replicas run. ``address`` None starts a local Ray (bounded by ``num_cpus``); 'auto' or
    'HOST:PORT' joins a running cluster (``ray start --head`` / ``ray start --address``)."""

    replicas: int = 1
    address: str | None = None
    gpus_per_replica: float | None = None  # None: 1 where the driver sees CUDA (settings.device auto/cuda), else 0
    cpus_per_replica: float = 1.0
    num_cpus: int | None = None  # a local Ray's CPUs (None: Ray's own count)
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, received {self.replicas}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, received {self.gpus_per_replica}")
        if self.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica must be >= 0, received {self.cpus_per_replica}")


def require_ray() -> None:
    """``RuntimeError`` saying how to install Ray Serve when it is missing."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise RuntimeError(RAY_HINT) from None


def gpus_for(options: RayOptions, settings: Settings) -> float:
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    if settings.device == "cpu":
        return 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


class ReplicaHeader:
    """ASGI middleware: every response says which replica answered (``X-Bptvlm-Replica``)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica)
            await send(message)

        await self.app(scope, receive, send_with_replica)


class BptvlmReplica:
    """One replica: its own service (model copy), the shared ledger and image depot, our app as ingress."""

    def __init__(self, settings: dict[str, Any], shared_ledger: str | None) -> None:
        from ray import serve

        from .app import build_service, open_ledger
        from .ray_images import SharedImageStore, depot_handle

        unique = serve.get_replica_context().replica_id.unique_id
        base = Settings(**settings)
        self.settings = base.model_copy(update={"replica_id": f"{base.replica_id or 'ray'}-{unique}"})
        self.replica = unique
        ledger = open_ledger(self.settings, target=shared_ledger)
        self.service = build_service(self.settings, ledger)
        depot = depot_handle(self.settings.image_cache_bytes, NAMESPACE)
        self.service.images = SharedImageStore(self.settings.image_cache_bytes, depot,
                                               self.service._preprocess_in_turns)
        import torch

        log.info("replica %s ready (ledger replica id %s, %d torch threads)", unique, self.settings.replica_id,
                 torch.get_num_threads())

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from .app import create_app

        app = create_app(self.settings, service=self.service)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray's health check is our readiness: raising takes the replica out and restarts it."""
        reason = self.service.readiness.reason
        if reason is not None:
            raise RuntimeError(f"replica {self.replica} not ready: {reason}")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.ledger.close()  # a clean stop drops this replica's holds at once


def deployment(settings: Settings, options: RayOptions) -> Any:
    """The bound Ray Serve application: ``options.replicas`` replicas of ``BptvlmReplica``."""
    from ray import serve

    shared = settings.ledger
    if shared is None:  # open mode: replicas still share one balance (one host; across hosts give --ledger)
        shared = str(Path(tempfile.mkdtemp(prefix="bptvlm-ray-ledger-")) / "ledger.db")
        log.info("open mode under Ray: the replicas share the ledger %s (one host; across hosts give --ledger "
                 "postgresql://...)", shared)
    actor = {"num_cpus": options.cpus_per_replica, "num_gpus": gpus_for(options, settings)}
    wrapped = serve.ingress()(BptvlmReplica)
    dep = serve.deployment(wrapped, name="bptvlm", num_replicas=options.replicas, ray_actor_options=actor,
                           max_ongoing_requests=max(8, settings.max_queue + 4),
                           health_check_period_s=options.health_check_period_s,
                           health_check_timeout_s=options.health_check_timeout_s)
    return dep.bind(settings.model_dump(mode="json"), shared)


def start(settings: Settings, options: RayOptions, host: str, port: int) -> None:
    """Connect to (or start) Ray, start Serve's proxy on ``host:port`` and deploy; returns when every
    replica is up (their start-up probes passed)."""
    require_ray()
    import ray
    from ray import serve

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # a local Ray's proxy inherits it (ray_proxy.py)
    if not ray.is_initialized():
        ray.init(address=options.address, num_cpus=options.num_cpus if options.address is None else None,
                 include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(settings, options), name=APP_NAME, route_prefix="/")
    log.info("serving %d Ray Serve replica(s) of %s on http://%s:%d", options.replicas, settings.model, host, port)


def stop() -> None:
    """Delete the app and Serve (and the local Ray this process started)."""
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(settings: Settings, options: RayOptions, host: str, port: int) -> None:
    """``bptvlm serve --engine ray``: start, then block until SIGINT/SIGTERM, then stop."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    start(settings, options, host, port)
    try:
        done.wait()
    finally:
        stop()


OPTION_ARGS = ("replicas", "gpus_per_replica", "cpus_per_replica")


def build_app(args: dict[str, Any]) -> Any:
    """The Serve config's entry (``import_path: bptvlm.server.ray_engine:build_app``, e.g. in a KubeRay
    ``RayService``'s ``serveConfigV2``): ``args`` holds ``Settings`` fields (the rest come from ``BPTVLM_*``
    variables) and the ``RayOptions`` fields ``replicas``, ``gpus_per_replica``, ``cpus_per_replica``."""
    args = dict(args)
    options = RayOptions(**{k: args.pop(k) for k in OPTION_ARGS if k in args})
    return deployment(Settings(**args), options)
