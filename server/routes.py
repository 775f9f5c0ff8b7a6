"""HTTP routes of the Open Inference Protocol (KServe V2). Thin: parse, call the service, encode."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import AuthError, NotFoundError, NotReadyError, PayloadTooLargeError
from bptvlm.shared.tensors import HEADER_LENGTH, encode_response

from .bodies import content_encoding, decode_body, inflate, read_body
from .ledger import KeyRecord
from .policy import access
from .service import InferenceResult, InferenceService

router = APIRouter()

ANONYMOUS = "anonymous"


def _inline_refs(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """A pydantic JSON schema with its ``$defs`` substituted in place (for openapi_extra)."""
    if defs is None:
        defs = schema.pop("$defs", {}) if isinstance(schema, dict) else {}
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline_refs(dict(defs[schema["$ref"].rsplit("/", 1)[-1]]), defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


# The body is read raw (JSON, or binary with a JSON header), so document it by hand: the JSON form.
_V2_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_refs(p.InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# Dependencies that only read app state are `async def`: a sync one costs a trip through anyio's shared
# thread pool for every request. Only the key lookup (a ledger query) takes a thread.
async def get_service(request: Request) -> InferenceService:
    service = request.app.state.service
    if service is None:
        raise NotReadyError("the model is still loading")
    return service


def get_api_key(request: Request, service: Annotated[InferenceService, Depends(get_service)]) -> KeyRecord:
    """The caller's key from ``Authorization: Bearer <token>``; in open mode everyone is 'anonymous'."""
    if request.app.state.settings.open_mode:
        return service.key(ANONYMOUS)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    key = service.authenticate(token.strip())
    if key is None:
        raise AuthError("unknown API key")
    return key


async def rate_limit(request: Request, key: Annotated[KeyRecord, Depends(get_api_key)]) -> KeyRecord:
    """Spend one of the key's requests per minute (if it has a limit); headers tell what is left."""
    per_minute = key.requests_per_minute or request.app.state.settings.requests_per_minute
    if per_minute:
        state = request.app.state.limiter.take(key.id, per_minute)
        request.state.rate_headers = state.headers()
    return key


async def get_model_service(model_name: str, service: Annotated[InferenceService, Depends(get_service)],
                            request: Request) -> InferenceService:
    served = request.app.state.settings.model_name
    if model_name != served:
        raise NotFoundError(f"model {model_name!r} is not served here; this server serves {served!r}")
    return service


Service = Annotated[InferenceService, Depends(get_model_service)]
ApiKey = Annotated[KeyRecord, Depends(get_api_key)]
LimitedKey = Annotated[KeyRecord, Depends(rate_limit)]


# Health, metadata and metrics are `async def` without dependencies: they never take a worker thread,
# so they answer while every thread waits for the model.
@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    """The process answers."""
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready while the latest forward pass succeeded (a probe runs one when the server is idle)."""
    service = request.app.state.service
    reason = "the model is still loading" if service is None else service.readiness.reason
    if reason is not None:
        return JSONResponse({"ready": False, "error": reason}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/v2", response_model=p.ServerMetadata)
async def server_metadata() -> p.ServerMetadata:
    """Server name, version and protocol extensions."""
    return p.ServerMetadata(name="bptvlm", version="0.1.0", extensions=["binary_tensor_data", "image_upload",
                                                                            "classification"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests by status, candidates, latencies, queue, cache hits. Series by
    key (tenants' usage) only with ``Authorization: Bearer <metrics token>``."""
    m, service = request.app.state.metrics, request.app.state.service
    if service is not None:
        m.queue_depth.set(service.admission.waiting)
        for name, (hits, misses) in service.cache_stats().items():
            m.cache_hits.labels(name).set(hits)
            m.cache_misses.labels(name).set(misses)
    token = request.app.state.settings.metrics_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    tenants = token is not None and scheme.lower() == "bearer" and secrets.compare_digest(given.strip(), token)
    return Response(m.render(tenants=tenants), media_type=CONTENT_TYPE_LATEST)


@router.get("/v2/usage", response_model=p.UsageReport)
def usage(service: Annotated[InferenceService, Depends(get_service)], key: ApiKey) -> p.UsageReport:
    """What the caller's key has been charged so far, and what remains of its quota."""
    return service.usage_report(key)


_OUTPUT_TENSORS = [p.MetadataTensor(name=p.LOSS, datatype="FP32", shape=[-1]),
                   p.MetadataTensor(name=p.LOGITS, datatype="FP32", shape=[-1, -1, -1]),
                   p.MetadataTensor(name=p.PROBS, datatype="FP32", shape=[-1, -1, -1]),
                   p.MetadataTensor(name=p.TOPK, datatype="BYTES", shape=[-1, -1, -1]),
                   p.MetadataTensor(name=p.LABEL, datatype="INT64", shape=[-1, -1])]


@router.get("/v2/models/{model_name}", response_model=p.ModelMetadata)
def model_metadata(model_name: str, service: Service, key: ApiKey) -> p.ModelMetadata:
    """Inputs, outputs and the prompt limits and statistics a client needs."""
    lim, policy = service.limits, service.output_policy(key)
    t = p.MetadataTensor
    return p.ModelMetadata(
        name=model_name,
        versions=["1"],
        platform="pytorch_transformers_clip",
        inputs=[
            t(name=p.TEXT_CONTEXT, datatype="FP32", shape=[-1, -1, lim.text_width]),
            t(name=p.VISUAL_PROMPT, datatype="FP32", shape=[-1, -1, lim.vision_width]),
            t(name=p.IMAGES, datatype="UINT8", shape=[-1, -1, -1, 3]),
            t(name=p.IMAGE_BATCH, datatype="BYTES", shape=[1]),
            t(name=p.LABELS, datatype="INT64", shape=[-1]),
            t(name=p.CLASS_NAMES, datatype="BYTES", shape=[-1]),
            t(name=p.TEXT_DEEP_PROMPT, datatype="FP32", shape=[-1, max(0, lim.text_layers - 1), -1, lim.text_width]),
            t(name=p.VISUAL_DEEP_PROMPT, datatype="FP32", shape=[-1, max(0, lim.vision_layers - 1), -1, lim.vision_width]),
        ],
        outputs=[o for o in _OUTPUT_TENSORS if o.name in policy.allowed],
        parameters={
            "protocol_version": p.PROTOCOL_VERSION,
            "model_id": service.model.model_id,
            "dtype": str(service.model.dtype).removeprefix("torch."),  # the served dtype (--dtype; auto: server/precision.py)
            "prompt": lim.model_dump(),
            "outputs": access(policy, service.degradation.decimals, service.degradation.noise),  # for this key
        },
    )


_TOKENIZE_BODY = {"requestBody": {"required": True,
                                  "content": {"application/json": {"schema": p.TokenizeRequest.model_json_schema()}}}}


def _count_tokens(service: InferenceService, body: bytes, max_json_bytes: int) -> p.TokenizeResponse:
    if len(body) > max_json_bytes:
        raise PayloadTooLargeError(f"the JSON body has {len(body)} bytes, over the limit of {max_json_bytes}")
    try:
        texts = p.TokenizeRequest.model_validate_json(body).texts
    except ValidationError as exc:  # the app's handler words it like any other invalid JSON body (422)
        raise RequestValidationError(exc.errors()) from None
    return p.TokenizeResponse(num_tokens=service.model.count_tokens(texts))


@router.post("/v2/models/{model_name}/tokenize", response_model=p.TokenizeResponse, openapi_extra=_TOKENIZE_BODY)
async def tokenize(request: Request, service: Service, key: LimitedKey) -> p.TokenizeResponse:
    """Token counts of texts under the served tokenizer (no forward pass, not charged); the body limit
    applies as to every other POST."""
    settings = request.app.state.settings
    encoding = content_encoding(request)
    body = await read_body(request, settings)
    return await run_in_threadpool(
        lambda: _count_tokens(service, inflate(body, encoding, settings.max_body_bytes), settings.max_json_bytes))


def _upload(service: InferenceService, request: Request, body: bytes, encoding: str, key: KeyRecord) -> p.ImageUploadResponse:
    settings = request.app.state.settings
    _, arrays = decode_body(inflate(body, encoding, settings.max_body_bytes), request.headers.get(HEADER_LENGTH), settings)
    return service.upload(arrays, key)


@router.post("/v2/models/{model_name}/images", response_model=p.ImageUploadResponse, openapi_extra=_V2_BODY)
async def upload_images(request: Request, service: Service, key: LimitedKey) -> p.ImageUploadResponse:
    """Store an image batch (input 'images', UINT8 [N, H, W, 3]) for this key; returns its content-hash id.
    Preprocessing is work: it is admitted, queued and refused (503) like inference."""
    encoding = content_encoding(request)
    with service.admission.admit():
        body = await read_body(request, request.app.state.settings)
        return await service.admission.run(_upload, service, request, body, encoding, key)


def _infer(service: InferenceService, request: Request, model_name: str, body: bytes, encoding: str,
           key: KeyRecord) -> tuple[InferenceResult, bytes, dict[str, str]]:
    """Decode, infer and encode (in a worker thread): the result, the response body and its headers."""
    settings = request.app.state.settings
    body = inflate(body, encoding, settings.max_body_bytes)
    req, arrays = decode_body(body, request.headers.get(HEADER_LENGTH), settings)
    result = service.infer(req, arrays, key, hashlib.sha256(body).hexdigest())
    assert result.total is not None
    parameters = {"usage": result.usage.model_dump(), "usage_total": result.total.usage.model_dump()}
    response = p.InferenceResponse(model_name=model_name, model_version="1", id=req.id, parameters=parameters, outputs=[])
    content, headers = encode_response(response, result.outputs, result.binary)
    return result, content, headers


@router.post("/v2/models/{model_name}/infer", openapi_extra=_V2_BODY)
async def infer(model_name: str, request: Request, service: Service, key: LimitedKey) -> Response:
    """Loss [P] and/or logits [P, N, C] for a population of prompts; one query per candidate."""
    encoding = content_encoding(request)
    with service.admission.admit():  # before the body is read or a thread taken: a full queue is a fast 503
        body = await read_body(request, request.app.state.settings)
        result, content, content_headers = await service.admission.run(
            _infer, service, request, model_name, body, encoding, key)
    metrics = request.app.state.metrics
    if not result.replayed:
        metrics.charged(key.name, result.usage.candidates)
        metrics.queue_wait.observe(result.queue_s)
        metrics.inference.observe(result.forward_s)
    headers = dict(getattr(request.state, "rate_headers", {}))
    assert result.total is not None
    if result.total.remaining is not None:
        headers["X-Query-Budget-Remaining"] = str(result.total.remaining)
    if result.replayed:
        headers["X-Idempotent-Replay"] = "true"
    return Response(content=content, headers={**content_headers, **headers})
