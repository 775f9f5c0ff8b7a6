"""``create_app(settings)``: assembles the FastAPI service; the model loads in the lifespan."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bptvlm.shared.errors import BptvlmError, BudgetExhaustedError, NotReadyError, RateLimitedError
from bptvlm.shared.protocol import ErrorResponse

from .config import Settings
from .health import ProbeLoop
from .admission import RateLimiter
from .calibration import measure_batch_images
from .ledger import Ledger, hash_token
from .observability import Metrics, RequestContext
from .loading import load_model
from .model import PromptedCLIP
from .precision import dtype_name, resolve_dtype
from .routes import ANONYMOUS, router
from .service import InferenceService

log = logging.getLogger(__name__)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_ledger(settings: Settings, target: str | None = None) -> Ledger:
    """The ledger of ``settings.ledger`` (or one in memory; ``target``: this one instead, e.g. the file that
    Ray replicas in open mode share), with the --api-key tokens and 'anonymous' in it. Replicas starting
    together may race to add the same key: the loser finds it there."""
    ledger = Ledger(target or settings.ledger, replica_id=settings.replica_id, lease_s=settings.ledger_lease_s)
    known = {k.name for k in ledger.keys()}
    for i, token in enumerate(settings.api_keys):
        if ledger.authenticate(token) is None:
            with contextlib.suppress(ValueError):  # another replica added it meanwhile
                ledger.create_key(f"token-{i}-{hash_token(token)[:8]}", quota=settings.quota,
                                  requests_per_minute=settings.requests_per_minute, token=token)
    if settings.open_mode and ANONYMOUS not in known:
        with contextlib.suppress(ValueError):
            ledger.create_key(ANONYMOUS, quota=settings.quota, requests_per_minute=settings.requests_per_minute,
                              token=secrets.token_hex(16))
    return ledger


def compile_encoders(model: PromptedCLIP) -> None:
    """``torch.compile`` the vision and text encoders in place (``--compile``). Shapes are dynamic: the
    population, the chunk size, the prompt length and the trimmed text length vary from request to request.
    The first forward compiles (the start-up probe; tens of seconds); results equal the uncompiled ones
    within float32 rounding (tests/server/test_compile.py)."""
    model.model.vision_model.encoder.compile(dynamic=True)
    model.model.text_model.encoder.compile(dynamic=True)


def build_service(settings: Settings, ledger: Ledger | None = None) -> InferenceService:
    """Load the model, wrap it in the service layer, and check one tiny forward pass (the readiness probe)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    loaded = load_model(settings.model, seed=settings.seed)
    # compiled encoders choose their own kernels, so packed weights would only hold memory there
    pack = None if settings.pack_linears and not settings.compile else False
    model = PromptedCLIP(loaded, device=device, dtype=dtype, max_batch_images=settings.max_batch_images, pack=pack)
    if settings.max_batch_images is None and settings.measure_chunks and device.type == "cpu":
        measure_batch_images(model)  # before compiling: every size tried would compile
    if settings.compile:
        log.info("compiling the vision and text encoders (torch.compile); the start-up probe waits for it")
        compile_encoders(model)
    service = InferenceService(model, settings, ledger or open_ledger(settings))
    service.probe()
    log.info("serving %s on %s in %s (--dtype %s): %s", loaded.model_id, device, dtype_name(dtype), settings.dtype,
             model.limits)
    return service


def _error_response(exc: BptvlmError) -> JSONResponse:
    headers = {}
    if isinstance(exc, (RateLimitedError, NotReadyError)):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, BudgetExhaustedError) and exc.remaining is not None:
        headers["X-Query-Budget-Remaining"] = str(exc.remaining)
    return _error(exc.message, exc.status_code, headers)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error body has the contract's one shape: ``{"error": message}``."""
    return JSONResponse(ErrorResponse(error=message).model_dump(), status_code=status, headers=headers)


def create_app(settings: Settings | None = None, service: InferenceService | None = None) -> FastAPI:
    """The app. ``service`` injects an already-built service (tests); else the lifespan builds one."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.open_mode:
            log.warning("OPEN MODE: no ledger and no API keys; every caller is 'anonymous'")
        built = app.state.service is None
        if built:
            app.state.service = build_service(settings)
        service = app.state.service
        probes = None
        if settings.ready_probe_s > 0:  # keeps readiness current while no request comes
            probes = ProbeLoop(service.probe, service.readiness, settings.ready_probe_s).start()
        yield
        if probes is not None:
            probes.stop()
        if built:  # an injected service belongs to the caller
            service.ledger.close()

    app = FastAPI(
        title="bptvlm",
        summary="A frozen CLIP behind the Open Inference Protocol (KServe V2): prompts in, logits and loss out.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.limiter = RateLimiter()
    app.state.metrics = Metrics()
    app.add_middleware(RequestContext)
    app.include_router(router)

    @app.exception_handler(BptvlmError)
    async def _bptvlm_error(request: Request, exc: BptvlmError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(f"invalid request at {where}: {first.get('msg', 'invalid')}", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: still the contract's shape
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return _error(f"internal server error ({type(exc).__name__}); the request id is in X-Request-ID", 500)

    return app
