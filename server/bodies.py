"""Request bodies: read under a deadline and a byte cap, inflate gzip/deflate under the same cap, decode.

``read_body`` runs on the event loop (it only waits for bytes); ``decode_body`` does the CPU work and
runs in a worker thread, so neither a huge body nor a slow one stalls the loop.
"""

from __future__ import annotations

import zlib

import anyio
import numpy as np
from fastapi import Request

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import PayloadTooLargeError, ProtocolError, RequestTimeoutError, UnsupportedMediaTypeError
from bptvlm.shared.tensors import decode_request

from .config import Settings

ENCODINGS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib wbits


def content_encoding(request: Request) -> str:
    """The body's Content-Encoding, refused (415) unless the server can inflate it."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in ENCODINGS:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding!r} is not supported; send the body as identity, gzip or deflate"
        )
    return encoding


async def read_body(request: Request, settings: Settings) -> bytes:
    """The raw body: at most ``max_body_bytes``, all of it within ``body_timeout_s`` (else 413 / 408)."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    try:
        with anyio.fail_after(settings.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLargeError(f"body is over the limit of {limit} bytes")
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body did not arrive within {settings.body_timeout_s:g} s ({len(body)} bytes came); send it again"
        ) from None
    return bytes(body)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decompressed, refusing (413) more than ``limit`` bytes out without ever holding more."""
    wbits = ENCODINGS[encoding]
    if wbits is None:
        return body
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the {encoding} body cannot be inflated: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"the {encoding} body inflates to over the limit of {limit} bytes")
    return out


def decode_body(
    body: bytes, header_length: str | None, settings: Settings
) -> tuple[p.InferenceRequest, dict[str, np.ndarray]]:
    """``(InferenceRequest, arrays)`` of an inflated body; its JSON part at most ``max_json_bytes``."""
    json_bytes = len(body) if header_length is None else (int(header_length) if header_length.isdigit() else 0)
    if json_bytes > settings.max_json_bytes:
        raise PayloadTooLargeError(
            f"the JSON part of the body has {json_bytes} bytes, over the limit of {settings.max_json_bytes}; "
            "send large tensors as binary tensor data"
        )
    return decode_request(body, header_length, max_bytes_elements=max(settings.max_classes, 1))
