"""Property test over the binary and JSON codecs: whatever body a client builds, the answer is 200 or a
JSON 4xx, never a 5xx. Shapes, datatypes, byte counts, nesting and strings (lone surrogates included)
are drawn freely, then sent to inference and upload."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bptvlm.server.app import build_service, create_app
from bptvlm.server.config import Settings
from bptvlm.shared import protocol as p

SETTINGS = Settings(device="cpu", api_keys=("k",), max_population=4, max_images=8, max_classes=8,
                    max_response_bytes=50_000, max_body_bytes=200_000, ready_probe_s=0)

dims = st.one_of(st.integers(0, 4), st.sampled_from([-1, 32, 2**31, 2**62, 2**63, 10**9, 2**70]))
shapes = st.lists(dims, max_size=5)
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
strings = st.one_of(st.text(max_size=6), surrogates, st.sampled_from(["a.", "cat.", "sha256:00"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=False, width=32), strings)
data = st.recursive(st.lists(scalars, max_size=12), lambda inner: st.lists(inner, max_size=3), max_leaves=40)
datatypes = st.sampled_from(["FP32", "FP16", "FP64", "UINT8", "INT64", "INT32", "BOOL", "BYTES", "FP99", ""])
names = st.sampled_from([*p.INPUT_NAMES, "x"])
parameters = st.dictionaries(st.sampled_from([p.PARAM_LOSS, p.PARAM_FOCAL_GAMMA, p.PARAM_VISUAL_PROMPT_POSITION,
                                              p.PARAM_CONTEXT_INIT, "binary_data_output", "other"]),
                             scalars, max_size=3)


@st.composite
def tensors(draw: st.DrawFn, binary: bool) -> tuple[dict[str, Any], bytes]:
    tensor: dict[str, Any] = {"name": draw(names), "shape": draw(shapes), "datatype": draw(datatypes)}
    if binary:
        raw = draw(st.binary(max_size=64))
        size = draw(st.one_of(st.just(len(raw)), st.integers(-2, 80)))
        tensor["parameters"] = {"binary_data_size": size}
        return tensor, raw
    tensor["data"] = draw(data)
    return tensor, b""


def _valid(binary: bool) -> list[tuple[dict[str, Any], bytes]]:
    """A valid request's tensors (a population of 2, two 8 x 8 images, two classes)."""
    ctx = {"name": p.TEXT_CONTEXT, "shape": [2, 1, 32], "datatype": "FP32"}
    img = {"name": p.IMAGES, "shape": [2, 8, 8, 3], "datatype": "UINT8"}
    lab = {"name": p.LABELS, "shape": [2], "datatype": "INT64"}
    cls = {"name": p.CLASS_NAMES, "shape": [2], "datatype": "BYTES"}
    if not binary:
        return [(ctx | {"data": [0.0] * 64}, b""), (img | {"data": [0] * 384}, b""), (lab | {"data": [0, 1]}, b""),
                (cls | {"data": ["a.", "b."]}, b"")]
    raws = [b"\x00" * 256, b"\x00" * 384, b"\x00" * 8 + b"\x01" + b"\x00" * 7, b"\x02\x00\x00\x00a.\x02\x00\x00\x00b."]
    return [(t | {"parameters": {"binary_data_size": len(r)}}, r) for t, r in zip((ctx, img, lab, cls), raws)]


def _nested(depth: int) -> bytes:
    return b'{"inputs": [{"name": "labels", "shape": [1], "datatype": "INT64", "data": ' + b"[" * depth + b"1" \
        + b"]" * depth + b"}]}"


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A valid request with some of its tensors replaced, dropped or added; sometimes deeply nested JSON."""
    if draw(st.integers(0, 5)) == 0:
        return _nested(draw(st.sampled_from([3, 900, 5000, 100_000]))), {"Content-Type": "application/json"}
    binary = draw(st.booleans())
    parts = _valid(binary)
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(parts)))
        drawn = draw(tensors(binary))
        if draw(st.booleans()):  # keep the valid tensor's name: a bad value where a good one was expected
            drawn = (drawn[0] | {"name": parts[i % len(parts)][0]["name"]}, drawn[1])
        parts[i % len(parts)] = drawn if i < len(parts) else parts[i % len(parts)]
        if i == len(parts):
            parts.append(drawn)
    if draw(st.integers(0, 4)) == 0:
        parts.pop(draw(st.integers(0, len(parts) - 1)))
    header: dict[str, Any] = {"inputs": [t for t, _ in parts]}
    if draw(st.booleans()):
        header["parameters"] = draw(parameters)
    if draw(st.booleans()):
        header["outputs"] = [{"name": n} for n in draw(st.lists(st.sampled_from(["loss", "logits", "x"]), max_size=2))]
    if draw(st.booleans()):
        header["id"] = draw(strings)
    head = json.dumps(header).encode()  # ensure_ascii: lone surrogates travel as \\udXXX escapes
    if not binary:
        return head, {"Content-Type": "application/json"}
    tail = b"".join(raw for _, raw in parts)
    length = draw(st.one_of(st.just(len(head)), st.integers(-1, len(head) + len(tail) + 2)))
    return head + tail, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(SETTINGS, service=build_service(SETTINGS)), headers={"Authorization": "Bearer k"}) as c:
        yield c


def _issue_case(tensor: dict[str, Any], raw: bytes = b"", **header: Any) -> tuple[bytes, dict[str, str]]:
    """The valid JSON request with ``tensor`` in place of the one of its name (or added): the issue's 500s."""
    parts = [t for t, _ in _valid(False) if t["name"] != tensor["name"]] + [tensor]
    head = json.dumps({"inputs": parts, **header}).encode()
    if not raw:
        return head, {"Content-Type": "application/json"}
    return head + raw, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


@given(body=bodies(), path=st.sampled_from(["infer", "images"]))
@example(body=(_nested(100_000), {"Content-Type": "application/json"}), path="infer")
@example(body=_issue_case({"name": p.CLASS_NAMES, "shape": [10**9, 10**9], "datatype": "BYTES",
                           "parameters": {"binary_data_size": 4}}, b"\x00" * 4), path="infer")
@example(body=_issue_case({"name": p.TEXT_CONTEXT, "shape": [0, 2**62], "datatype": "FP32", "data": []}), path="infer")
@example(body=_issue_case({"name": p.CLASS_NAMES, "shape": [0], "datatype": "BYTES", "data": []}), path="infer")
@example(body=_issue_case({"name": p.CLASS_NAMES, "shape": [2], "datatype": "BYTES", "data": ["\ud800", "b."]}),
         path="infer")
@example(body=_issue_case({"name": p.LABELS, "shape": [2], "datatype": "INT64", "data": [0, 1]},
                          parameters={p.PARAM_CONTEXT_INIT: "\udc00"}), path="infer")
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_body_yields_a_server_error(client: TestClient, body: tuple[bytes, dict[str, str]], path: str) -> None:
    content, headers = body
    r = client.post(f"/v2/models/clip/{path}", content=content, headers=headers)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300], content[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json") and "error" in r.json()
