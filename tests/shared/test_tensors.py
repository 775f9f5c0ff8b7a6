"""Property tests of the wire encoding: what goes in comes out, and bad bytes are named errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from bptvlm.shared.errors import InvalidTensorError, ProtocolError
from bptvlm.shared.protocol import InferenceRequest
from bptvlm.shared.tensors import (
    DATATYPES,
    HEADER_LENGTH,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from bptvlm.shared.protocol import InferenceResponse

numeric = st.sampled_from(sorted(DATATYPES)).flatmap(
    lambda name: arrays(DATATYPES[name], array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
texts = st.lists(st.text(max_size=12), max_size=6).map(lambda xs: np.array([x.encode() for x in xs] or [b""], dtype=object))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind == "f":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@given(array=numeric, words=texts)
@settings(max_examples=60, deadline=None)
def test_request_roundtrip(binary: bool, array: np.ndarray, words: np.ndarray) -> None:
    if not binary and array.dtype.kind == "f" and not np.isfinite(array).all():
        array = np.nan_to_num(array)  # JSON has no NaN/Inf
    body, headers = encode_request({"x": array, "names": words}, outputs=["loss"], binary=binary, request_id="r1")
    request, decoded = decode_request(body, headers.get(HEADER_LENGTH))
    assert request.id == "r1" and [o.name for o in request.outputs or []] == ["loss"]
    assert _same(decoded["x"], array) and decoded["x"].dtype == DATATYPES[request.inputs[0].datatype]
    assert list(decoded["names"]) == list(words)


@given(array=arrays(np.float32, array_shapes(min_dims=1, max_dims=3, max_side=4)))
@settings(max_examples=30, deadline=None)
def test_response_roundtrip(array: np.ndarray) -> None:
    response = InferenceResponse(model_name="clip", id="7", outputs=[])
    body, headers = encode_response(response, {"logits": array, "loss": array.reshape(-1)}, {"logits": True})
    decoded_response, decoded = decode_response(body, headers.get(HEADER_LENGTH))
    assert decoded_response.id == "7"
    assert _same(decoded["logits"], array) and _same(decoded["loss"], array.reshape(-1))


@given(body=st.binary(max_size=200), header=st.one_of(st.none(), st.integers(-5, 300).map(str), st.text(max_size=4)))
@settings(max_examples=200, deadline=None)
def test_garbage_bodies_raise_protocol_errors_only(body: bytes, header: str | None) -> None:
    try:
        decode_request(body, header)
    except ProtocolError:
        pass


@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    delta=st.integers(-3, 3).filter(lambda d: d != 0),
)
@settings(max_examples=50, deadline=None)
def test_byte_count_mismatch_names_the_tensor(shape: list[int], delta: int) -> None:
    n = int(np.prod(shape)) * 4 + delta
    if n < 0:
        return
    header = {"inputs": [{"name": "text_context", "shape": shape, "datatype": "FP32",
                          "parameters": {"binary_data_size": n}}]}
    head = json.dumps(header).encode()
    with pytest.raises(InvalidTensorError, match="text_context.*needs .* bytes, received"):
        decode_request(head + b"\0" * n, str(len(head)))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "x", "shape": [2], "datatype": "FP128", "data": [1, 2]}, "datatype 'FP128' is not one of"),
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}, "needs 3 elements, received 2"),
        ({"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}, "must be non-negative"),
        ({"name": "x", "shape": [1], "datatype": "INT64", "data": ["a"]}, "not valid INT64"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "no data and no binary_data_size"),
    ],
    ids=["unknown-dtype", "count", "negative-dim", "bad-value", "no-data"],
)
def test_json_tensor_errors(tensor: dict, message: str) -> None:
    body = json.dumps({"inputs": [tensor]}).encode()
    with pytest.raises(InvalidTensorError, match=message):
        decode_request(body, None)


def test_unclaimed_binary_bytes_are_rejected() -> None:
    body, headers = encode_request({"x": np.zeros(2, np.float32)})
    with pytest.raises(ProtocolError, match="not claimed"):
        decode_request(body + b"\0\0", headers[HEADER_LENGTH])


@given(st.dictionaries(st.sampled_from(["id", "inputs", "outputs", "extra", "parameters"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2))))
@settings(max_examples=100, deadline=None)
def test_schema_validation_never_crashes(doc: dict) -> None:
    try:
        InferenceRequest.model_validate(doc)
    except ValueError:
        pass
    try:
        decode_request(json.dumps(doc).encode(), None)
    except ProtocolError:
        pass
