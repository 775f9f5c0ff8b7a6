"""Tensor encoding on the wire: V2 JSON tensors and the binary tensor data extension.

Binary body layout (KServe V2 binary extension)::

    [ JSON header (Inference-Header-Content-Length bytes) ][ tensor 1 bytes ][ tensor 2 bytes ] ...

Each binary tensor names its size in ``parameters.binary_data_size``. Numbers are little-endian,
row-major. A BYTES element is a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydantic_core
from pydantic import BaseModel

from .errors import InvalidTensorError, PayloadTooLargeError, ProtocolError
from .protocol import InferenceRequest, InferenceResponse, RequestedOutput, TensorData

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# The dtype whitelist: V2 datatype -> numpy dtype (little-endian). BYTES is handled apart.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
MAX_DIMS = 8
MAX_DIM_SIZE = 2**31 - 1  # one dimension
MAX_ELEMENTS = 2**40  # the product of the non-zero dimensions (numpy refuses far less than 2**63 bytes)


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array (object/str arrays are BYTES)."""
    if array.dtype.kind in "OUS":
        return BYTES
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return name
    raise InvalidTensorError(f"dtype {array.dtype} is not supported; use one of {sorted(DATATYPES)} or BYTES")


def _num_elements(name: str, shape: Sequence[int]) -> int:
    if len(shape) > MAX_DIMS:
        raise InvalidTensorError(f"tensor '{name}': {len(shape)} dimensions, at most {MAX_DIMS} allowed")
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise InvalidTensorError(f"tensor '{name}': shape {list(shape)} must be non-negative integers")
    if any(d > MAX_DIM_SIZE for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidTensorError(
            f"tensor '{name}': shape {list(shape)} is too large (at most {MAX_DIM_SIZE} per dimension and "
            f"{MAX_ELEMENTS} elements, counting a zero dimension as one)"
        )
    return math.prod(shape)


# --- BYTES elements ---------------------------------------------------------------------------


def _pack_bytes(items: Sequence[bytes]) -> bytes:
    out = bytearray()
    for item in items:
        out += len(item).to_bytes(4, "little") + item
    return bytes(out)


def _unpack_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise InvalidTensorError(f"tensor '{name}': BYTES data ends inside element {len(items)}")
        size = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(raw):
            raise InvalidTensorError(f"tensor '{name}': BYTES element {len(items)} claims {size} bytes past the end")
        items.append(raw[pos : pos + size])
        pos += size
    if pos != len(raw):
        raise InvalidTensorError(f"tensor '{name}': {len(raw) - pos} trailing bytes after {count} BYTES elements")
    return items


def _as_bytes_list(array: np.ndarray) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in array.reshape(-1).tolist()]


# --- one tensor -------------------------------------------------------------------------------


def to_wire(name: str, array: np.ndarray, *, binary: bool) -> tuple[TensorData, bytes]:
    """Describe ``array`` as a V2 tensor; return its JSON part and its binary bytes (b"" for JSON)."""
    array = np.asarray(array)
    datatype = datatype_of(array)
    shape = list(array.shape)
    if datatype == BYTES:
        items = _as_bytes_list(array)
        if binary:
            raw = _pack_bytes(items)
            return TensorData(name=name, shape=shape, datatype=BYTES, parameters={"binary_data_size": len(raw)}), raw
        data = [x.decode("utf-8") for x in items]
        return TensorData(name=name, shape=shape, datatype=BYTES, data=data), b""
    if binary:
        raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
        return TensorData(name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(raw)}), raw
    return TensorData(name=name, shape=shape, datatype=datatype, data=array.reshape(-1).tolist()), b""


def from_wire(tensor: TensorData, raw: bytes | None, max_bytes_elements: int | None = None) -> np.ndarray:
    """Decode one tensor from its JSON ``data`` or its ``raw`` binary bytes, validating sizes.

    BYTES tensors decode to an object array of ``bytes``; more than ``max_bytes_elements`` of them are
    refused before any is unpacked (each is a Python object: millions cost seconds and gigabytes).
    """
    name, datatype = tensor.name, tensor.datatype
    count = _num_elements(name, tensor.shape)
    if datatype == BYTES and max_bytes_elements is not None and count > max_bytes_elements:
        raise PayloadTooLargeError(f"tensor '{name}': {count} BYTES elements, at most {max_bytes_elements}")
    if datatype != BYTES and datatype not in DATATYPES:
        raise InvalidTensorError(f"tensor '{name}': datatype {datatype!r} is not one of {sorted(DATATYPES)} or BYTES")
    if raw is not None:
        if tensor.data is not None:
            raise InvalidTensorError(f"tensor '{name}': has both JSON data and binary_data_size")
        if datatype == BYTES:
            if count * 4 > len(raw):  # every element has a 4-byte length: refuse before allocating
                raise InvalidTensorError(
                    f"tensor '{name}': shape {tensor.shape} BYTES needs at least {count * 4} bytes, received {len(raw)}"
                )
            out = np.empty(count, dtype=object)
            out[:] = _unpack_bytes(name, raw, count)
            return out.reshape(tensor.shape)
        dtype = DATATYPES[datatype]
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidTensorError(
                f"tensor '{name}': shape {tensor.shape} {datatype} needs {expected} bytes, received {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    if tensor.data is None:
        raise InvalidTensorError(f"tensor '{name}': no data and no binary_data_size")
    flat = _flatten(tensor.data)
    if len(flat) != count:
        raise InvalidTensorError(f"tensor '{name}': shape {tensor.shape} needs {count} elements, received {len(flat)}")
    if datatype == BYTES:
        out = np.empty(count, dtype=object)
        out[:] = [_bytes_element(name, x) for x in flat]
        return out.reshape(tensor.shape)
    try:
        return np.asarray(flat, dtype=DATATYPES[datatype]).reshape(tensor.shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidTensorError(f"tensor '{name}': data is not valid {datatype}: {exc}") from None


def _bytes_element(name: str, x: Any) -> bytes:
    if isinstance(x, str):
        try:
            return x.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTensorError(f"tensor '{name}': a BYTES element is not valid UTF-8 (a lone surrogate)") from None
    if isinstance(x, bytes):
        return x
    raise InvalidTensorError(f"tensor '{name}': BYTES elements must be strings, received {type(x).__name__}")


def _flatten(data: list[Any]) -> list[Any]:
    # V2 allows flat or nested row-major lists; nested lists are flattened.
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


# --- whole messages ---------------------------------------------------------------------------


def _assemble(header: BaseModel, chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = header.model_dump_json(exclude_none=True).encode("utf-8")  # serialised in Rust, off the GIL-heavy path
    if not any(chunks):
        return head, {"Content-Type": JSON_CONTENT_TYPE}
    headers = {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}
    return head + b"".join(chunks), headers


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] = (),
    binary: bool = True,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    output_parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an inference request; with ``binary`` the outputs are asked as binary too.
    ``output_parameters``: output name -> its parameters (e.g. ``{"topk": {"classification": 3}}``)."""
    tensors, chunks = [], []
    for name, array in inputs.items():
        td, raw = to_wire(name, array, binary=binary)
        tensors.append(td)
        chunks.append(raw)
    out_params = {"binary_data": True} if binary else None
    request = InferenceRequest(
        id=request_id,
        parameters=dict(parameters) if parameters else None,
        inputs=tensors,
        outputs=[RequestedOutput(name=n, parameters={**(out_params or {}), **(output_parameters or {}).get(n, {})} or None)
                 for n in outputs] or None,
    )
    return _assemble(request, chunks)


def encode_response(
    response: InferenceResponse, arrays: Mapping[str, np.ndarray], binary: Mapping[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """Fill ``response.outputs`` from ``arrays`` (binary where asked) and return body and headers."""
    tensors, chunks = [], []
    for name, array in arrays.items():
        td, raw = to_wire(name, array, binary=binary.get(name, False))
        tensors.append(td)
        chunks.append(raw)
    response = response.model_copy(update={"outputs": tensors})
    return _assemble(response, chunks)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Split a body into its parsed JSON header and the binary tail."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, received {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head, tail = body[:n], body[n:]
    try:  # pydantic's parser (Rust): 5x faster than json.loads, bounded depth, refuses lone surrogates
        parsed = pydantic_core.from_json(head)
    except ValueError as exc:
        raise ProtocolError(f"body is not valid JSON ({exc}); binary bodies need {HEADER_LENGTH}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"JSON body must be an object, received {type(parsed).__name__}")
    return parsed, tail


def decode_tensors(
    tensors: Sequence[TensorData], tail: bytes, max_bytes_elements: int | None = None
) -> dict[str, np.ndarray]:
    """Decode every tensor, taking binary ones from ``tail`` in order; every byte must be used."""
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for tensor in tensors:
        if tensor.name in arrays:
            raise InvalidTensorError(f"tensor '{tensor.name}' appears twice")
        size = (tensor.parameters or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidTensorError(f"tensor '{tensor.name}': binary_data_size must be a non-negative integer")
            if pos + size > len(tail):
                raise InvalidTensorError(
                    f"tensor '{tensor.name}': binary_data_size {size} runs past the body ({len(tail) - pos} bytes left)"
                )
            raw = tail[pos : pos + size]
            pos += size
        arrays[tensor.name] = from_wire(tensor, raw, max_bytes_elements)
    if pos != len(tail):
        raise ProtocolError(f"{len(tail) - pos} bytes of binary data are not claimed by any tensor")
    return arrays


def decode_request(
    body: bytes, header_length: str | None, max_bytes_elements: int | None = None
) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    from pydantic import ValidationError

    parsed, tail = split_body(body, header_length)
    try:
        request = InferenceRequest.model_validate(parsed)
    except ValidationError as exc:
        raise ProtocolError(f"invalid inference request: {first_errors(exc)}") from None
    return request, decode_tensors(request.inputs, tail, max_bytes_elements)


def decode_response(body: bytes, header_length: str | None) -> tuple[InferenceResponse, dict[str, np.ndarray]]:
    from pydantic import ValidationError

    parsed, tail = split_body(body, header_length)
    try:
        response = InferenceResponse.model_validate(parsed)
    except ValidationError as exc:
        raise ProtocolError(f"invalid inference response: {first_errors(exc)}") from None
    return response, decode_tensors(response.outputs, tail)


def first_errors(exc: Any, limit: int | None = 3) -> str:
    """``loc: msg`` of a pydantic ``ValidationError``'s first ``limit`` errors (all with None), joined by "; "."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
