"""HTTP routes of the Open Inference Protocol (KServe V2). Thin: parse, call the service, encode."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import AuthError, NotFoundError, NotReadyError, PayloadTooLargeError
from bptvlm.shared.tensors import HEADER_LENGTH, decode_request, encode_response

from .service import InferenceService

router = APIRouter()

ANONYMOUS = "anonymous"


def get_service(request: Request) -> InferenceService:
    service = request.app.state.service
    if service is None:
        raise NotReadyError("the model is still loading")
    return service


def get_api_key(request: Request) -> str:
    """The caller's key; in open mode (no keys configured) everyone is 'anonymous'."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    for key in keys:
        if hmac.compare_digest(key.encode(), token.encode()):
            return key
    raise AuthError("unknown API key")


def get_model_service(model_name: str, service: Annotated[InferenceService, Depends(get_service)],
                      request: Request) -> InferenceService:
    served = request.app.state.settings.model_name
    if model_name != served:
        raise NotFoundError(f"model {model_name!r} is not served here; this server serves {served!r}")
    return service


Service = Annotated[InferenceService, Depends(get_model_service)]
ApiKey = Annotated[str, Depends(get_api_key)]


async def _read_body(request: Request) -> bytes:
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
    return bytes(body)


@router.get("/v2/health/live")
def live() -> dict[str, bool]:
    """The process answers."""
    return {"live": True}


@router.get("/v2/health/ready")
def ready(request: Request) -> JSONResponse:
    """Ready once the model is loaded and a forward pass succeeded."""
    is_ready = request.app.state.service is not None
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/v2", response_model=p.ServerMetadata)
def server_metadata() -> p.ServerMetadata:
    """Server name, version and protocol extensions."""
    return p.ServerMetadata(name="bptvlm", version="0.1.0", extensions=["binary_tensor_data", "image_upload"])


@router.get("/v2/usage", response_model=p.UsageReport)
def usage(service: Annotated[InferenceService, Depends(get_service)], key: ApiKey) -> p.UsageReport:
    """What the caller's key has been charged so far, and what remains of its quota."""
    return p.UsageReport(usage=service.meter.usage(key), remaining=service.meter.remaining(key))


@router.get("/v2/models/{model_name}", response_model=p.ModelMetadata)
def model_metadata(model_name: str, service: Service, key: ApiKey) -> p.ModelMetadata:
    """Inputs, outputs and the prompt limits and statistics a client needs."""
    lim = service.limits
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
        ],
        outputs=[t(name=p.LOSS, datatype="FP32", shape=[-1]), t(name=p.LOGITS, datatype="FP32", shape=[-1, -1, -1])],
        parameters={
            "protocol_version": p.PROTOCOL_VERSION,
            "model_id": service.model.model_id,
            "prompt": lim.model_dump(),
        },
    )


@router.post("/v2/models/{model_name}/images", response_model=p.ImageUploadResponse)
async def upload_images(request: Request, service: Service, key: ApiKey) -> p.ImageUploadResponse:
    """Store an image batch (input 'images', UINT8 [N, H, W, 3]); returns its content-hash id."""
    body = await _read_body(request)
    _, arrays = decode_request(body, request.headers.get(HEADER_LENGTH))
    return await run_in_threadpool(service.upload, arrays)


@router.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request, service: Service, key: ApiKey) -> Response:
    """Loss [P] and/or logits [P, N, C] for a population of prompts; one query per candidate."""
    body = await _read_body(request)
    req, arrays = decode_request(body, request.headers.get(HEADER_LENGTH))
    result = await run_in_threadpool(service.infer, req, arrays, key)
    binary_all = bool((req.parameters or {}).get("binary_data_output", False))
    binary = {o.name: binary_all or bool((o.parameters or {}).get("binary_data", False)) for o in req.outputs or []}
    for name in result.outputs:
        binary.setdefault(name, binary_all)
    parameters = {"usage": result.usage.model_dump(), "usage_total": service.meter.usage(key).model_dump()}
    remaining = service.meter.remaining(key)
    headers = {} if remaining is None else {"X-Query-Budget-Remaining": str(remaining)}
    response = p.InferenceResponse(model_name=model_name, model_version="1", id=req.id, parameters=parameters, outputs=[])
    content, content_headers = encode_response(response, result.outputs, binary)
    return Response(content=content, headers={**content_headers, **headers})
