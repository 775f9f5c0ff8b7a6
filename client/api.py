"""A synchronous HTTP client for the bptvlm CLIP service (Open Inference Protocol / KServe V2).

    ClipClient(endpoint, *, api_key, model, timeout, binary, max_retries, retry_for, transport, http)
    ├── live() / ready() / wait_until_ready()     GET /v2/health/{live,ready}
    ├── check_server()                            GET /v2: fail fast if nothing bptvlm/V2 answers there
    ├── server_metadata() -> dict                 GET /v2
    ├── usage_report() -> UsageReport | None      GET /v2/usage: what the key spent and has left
    ├── model_metadata() -> ModelMetadata         GET /v2/models/{model}
    ├── prompt_limits() -> PromptLimits           model_metadata().parameters["prompt"]
    ├── upload_images(uint8 [N,H,W,3]) -> id      POST /v2/models/{model}/images (cached by content)
    └── infer(inputs, outputs=...) -> InferResult POST /v2/models/{model}/infer

Error responses (``{"error": msg}``) are raised as the ``bptvlm.shared.errors`` class of their status.
Retries, with exponential backoff and the same request id on every attempt: 503, 429 *with*
Retry-After (honoured), and connection failures. Never retried: 429 without Retry-After (the budget is
spent, waiting does not help) and every other 4xx. Retrying stops after ``max_retries`` attempts or
once ``retry_for`` seconds would have passed, whichever comes first (``max_retries=None``: only the
window counts, so a server restart within it goes unnoticed but for the wait).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bptvlm.shared.errors import BptvlmError, NotFoundError, NotReadyError, ProtocolError, RateLimitedError, error_from_status
from bptvlm.shared.protocol import (
    DEFAULT_MODEL_NAME,
    IMAGES,
    LOGITS,
    LOSS,
    PROTOCOL_VERSION,
    ImageUploadResponse,
    ModelMetadata,
    ServerMetadata,
    PromptLimits,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    UsageReport,
)
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=300.0)
REQUEST_ID_HEADER = "X-Request-ID"

# Failures where the request may never have reached the server, so sending it again is safe (and the
# request id lets the server recognise a duplicate). A read timeout is not here: the server may still
# be computing (and charging) the first attempt.
_RETRYABLE_TRANSPORT_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class InferResult:
    """Decoded inference response.

    loss:    float32 [P] (None unless asked and labels were sent)
    logits:  float32 [P, N, C] (None unless asked)
    usage:   what the server charged for this request (candidates = P)
    outputs: every output tensor by name
    parameters: the response's parameters (usage, and whatever else the server reports)
    """

    loss: np.ndarray | None
    logits: np.ndarray | None
    usage: Usage
    request_id: str | None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)


def add_usage(a: Usage, b: Usage) -> Usage:
    """Sum of two usage records."""
    return Usage(
        candidates=a.candidates + b.candidates,
        requests=a.requests + b.requests,
        image_forwards=a.image_forwards + b.image_forwards,
    )


def images_key(images: np.ndarray) -> str:
    """Client-side content hash of an image batch (dtype, shape and bytes)."""
    h = hashlib.sha256()
    h.update(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparsable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        logger.warning("ignoring unparsable Retry-After header %r", value)
        return None
    return max(0.0, when.timestamp() - time.time())


class UnreachableError(ConnectionError):
    """Nothing usable answers at the endpoint: connection refused, or not a bptvlm/V2 server."""


class ClipClient:
    """Client of one model on one bptvlm server. Use as a context manager, or call ``close()``.

    ``http`` lets a caller supply a ready ``httpx.Client`` (e.g. ``fastapi.testclient.TestClient``);
    the client then does not close it. Otherwise one is built from ``timeout`` and ``transport``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL_NAME,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        binary: bool = True,
        max_retries: int | None = 5,
        retry_for: float | None = None,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, received {max_retries}")
        if retry_for is not None and retry_for < 0:
            raise ValueError(f"retry_for must be >= 0 seconds, received {retry_for}")
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {endpoint!r} has no scheme: give the full URL, e.g. http://{endpoint.lstrip('/')}")
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.binary = binary
        self.max_retries = max_retries
        self.retry_for = retry_for
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout, transport=transport)
        self._image_ids: dict[str, str] = {}
        self.usage = Usage()
        """Sum of the usage the server reported over this client's inference requests."""

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ClipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClipClient({self.endpoint!r}, model={self.model!r})"

    # --- transport with retries -----------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.endpoint}{path}"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.max_backoff, self.backoff * 2.0**attempt)

    def _may_retry(self, attempt: int, waited: float, delay: float) -> bool:
        """Whether attempt ``attempt + 1`` is allowed after ``waited`` seconds (slept or elapsed,
        whichever is more) and a further ``delay``."""
        if self.max_retries is not None and attempt >= self.max_retries:
            return False
        return self.retry_for is None or waited + delay <= self.retry_for

    def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> httpx.Response:
        """Send with retries; return a 2xx response or raise the mapped ``BptvlmError``."""
        request_id = request_id or uuid.uuid4().hex
        all_headers = {**self._headers, REQUEST_ID_HEADER: request_id, **(headers or {})}
        url = self._url(path)
        started, slept = time.monotonic(), 0.0
        attempt = 0
        while True:
            waited = max(slept, time.monotonic() - started)
            try:
                response = self._http.request(method, url, content=content, headers=all_headers)
            except _RETRYABLE_TRANSPORT_ERRORS as exc:
                delay = self._delay(attempt, None)
                if not self._may_retry(attempt, waited, delay):
                    raise
                logger.warning("%s %s failed (%s); retry %d in %.1fs (%.0fs waited)", method, path, exc, attempt + 1, delay, waited)
            else:
                if response.is_success:
                    return response
                error = self._error(response)
                retryable = isinstance(error, (NotReadyError, RateLimitedError))
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = self._delay(attempt, retry_after)
                if not retryable or not self._may_retry(attempt, waited, delay):
                    raise error
                logger.warning(
                    "%s %s: %d %s; retry %d in %.1fs (%.0fs waited)",
                    method, path, response.status_code, error.message, attempt + 1, delay, waited,
                )  # fmt: skip
            self._sleep(delay)
            slept += delay
            attempt += 1

    @staticmethod
    def _error(response: httpx.Response) -> BptvlmError:
        try:
            message = str(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = response.text[:500] or response.reason_phrase
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return error_from_status(response.status_code, message, retry_after)

    def _get_json(self, path: str) -> Any:
        return self._request("GET", path).json()

    # --- health and metadata --------------------------------------------------------------------

    def _health(self, path: str) -> bool:
        try:
            response = self._http.get(self._url(path), headers=self._headers)
        except httpx.TransportError:
            return False
        return response.is_success

    def live(self) -> bool:
        """True when the server process answers (no retries)."""
        return self._health("/v2/health/live")

    def ready(self) -> bool:
        """True when the model is loaded and a test forward pass succeeded (no retries)."""
        return self._health("/v2/health/ready")

    def check_server(self, refused_for: float = 0.0, interval: float = 0.5) -> None:
        """``GET /v2`` once (retrying a refused connection for up to ``refused_for`` seconds): raise
        ``UnreachableError`` when nothing listens there or what answers is not a bptvlm/V2 server."""
        deadline = time.monotonic() + refused_for
        while True:
            try:
                response = self._http.get(self._url("/v2"), headers=self._headers)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if time.monotonic() >= deadline:
                    raise UnreachableError(f"connection refused at {self.endpoint} ({exc}): is `bptvlm serve` running "
                                           "there? (check --endpoint's host and port)") from None  # fmt: skip
                self._sleep(interval)
        try:
            ServerMetadata.model_validate(response.json())
        except ValueError:
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise UnreachableError(f"{self.endpoint} answered GET /v2 with {response.status_code} ({kind}): it is not a "
                                   "bptvlm/V2 server (check --endpoint's host and port)") from None  # fmt: skip

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll readiness until ``timeout`` seconds; raise ``NotReadyError`` if it never comes."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise NotReadyError(f"{self.endpoint} not ready after {timeout:.0f}s")
            self._sleep(interval)

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``: ``{"name", "version", "extensions"}``."""
        data: dict[str, Any] = self._get_json("/v2")
        return data

    def usage_report(self) -> UsageReport | None:
        """``GET /v2/usage``: what the caller's key was charged and has ``remaining`` (None: no quota);
        None from a server without the route."""
        try:
            return UsageReport.model_validate(self._get_json("/v2/usage"))
        except NotFoundError:
            return None

    def model_metadata(self) -> ModelMetadata:
        """``GET /v2/models/{model}``; checks the protocol version the server publishes."""
        metadata = ModelMetadata.model_validate(self._get_json(f"/v2/models/{self.model}"))
        version = metadata.parameters.get("protocol_version")
        if version is None:
            logger.warning("server does not publish protocol_version; assuming %s", PROTOCOL_VERSION)
        elif str(version) != PROTOCOL_VERSION:
            raise ProtocolError(f"server speaks bptvlm protocol {version}, this client speaks {PROTOCOL_VERSION}")
        return metadata

    def prompt_limits(self, metadata: ModelMetadata | None = None) -> PromptLimits:
        """Widths, prompt-token limits, image size and embedding statistics of the served model
        (from ``metadata`` when given, else fetched)."""
        metadata = metadata or self.model_metadata()
        prompt = metadata.parameters.get("prompt")
        if prompt is None:
            raise ProtocolError(f"model '{metadata.name}' metadata has no parameters['prompt']")
        return PromptLimits.model_validate(prompt)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """``POST /v2/models/{model}/tokenize``: tokens of each text under the served tokenizer (free)."""
        body = TokenizeRequest(texts=list(texts)).model_dump_json().encode()
        response = self._request("POST", f"/v2/models/{self.model}/tokenize", content=body,
                                 headers={"Content-Type": "application/json"})
        counts = TokenizeResponse.model_validate(response.json()).num_tokens
        if len(counts) != len(texts):
            raise ProtocolError(f"server counted {len(counts)} texts, {len(texts)} were sent")
        return counts

    # --- images and inference -------------------------------------------------------------------

    def upload_images(self, images: np.ndarray, *, force: bool = False) -> str:
        """Upload uint8 ``[N, H, W, 3]`` images once; return the server's ``image_batch`` id.

        Ids are cached per content hash, so uploading the same array again costs nothing; ``force``
        uploads anyway (after the server forgot the batch, say).
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], received {images.dtype} {list(images.shape)}")
        key = images_key(images)
        if not force and key in self._image_ids:
            return self._image_ids[key]
        body, headers = encode_request({IMAGES: images}, binary=self.binary)
        response = self._request("POST", f"/v2/models/{self.model}/images", content=body, headers=headers)
        upload = ImageUploadResponse.model_validate(response.json())
        if upload.num_images != len(images):
            raise ProtocolError(f"server stored {upload.num_images} images, {len(images)} were sent")
        logger.debug("uploaded %d images as %s (cached=%s)", len(images), upload.image_batch, upload.cached)
        self._image_ids[key] = upload.image_batch
        return str(upload.image_batch)

    def forget_images(self) -> None:
        """Drop the client-side upload cache (the next ``upload_images`` sends the pixels again)."""
        self._image_ids.clear()

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] = (LOSS,),
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        output_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> InferResult:
        """One inference request; a population of P candidates is one request. ``output_parameters``:
        output name -> its parameters (``{"topk": {"classification": 3}}``).

        inputs: name -> array, e.g. text_context float32 [P, n_ctx, D_t] (or [P, C, n_ctx, D_t]), image_batch bytes [1],
                labels int64 [N], class_names bytes/str [C]
        """
        request_id = request_id or uuid.uuid4().hex
        body, headers = encode_request(
            inputs, outputs=outputs, binary=self.binary, request_id=request_id, parameters=parameters,
            output_parameters=output_parameters,
        )
        response = self._request(
            "POST", f"/v2/models/{self.model}/infer", content=body, headers=headers, request_id=request_id
        )
        decoded, arrays = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        usage_data = (decoded.parameters or {}).get("usage")
        usage = Usage.model_validate(usage_data) if usage_data is not None else Usage()
        if usage_data is None:
            logger.warning("response to %s carries no usage", request_id)
        self.usage = add_usage(self.usage, usage)
        missing = [name for name in outputs if name not in arrays]
        if missing:
            raise ProtocolError(f"response lacks requested outputs {missing}; received {sorted(arrays)}")
        return InferResult(
            loss=arrays.get(LOSS),
            logits=arrays.get(LOGITS),
            usage=usage,
            request_id=decoded.id,
            outputs=arrays,
            parameters=dict(decoded.parameters or {}),
        )

