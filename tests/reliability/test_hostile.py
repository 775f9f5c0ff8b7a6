"""Hostile input costs the provider nothing: each defect of issue 13 as a regression test.

Thin and huge images, huge class names, huge responses, malformed bodies, thread-pool starvation,
non-finite outputs, cross-key batch ids, compressed bodies and replays past the reply cache.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.server import bodies, routes
from bptvlm.server.app import build_service, create_app
from bptvlm.server.cache import ByteLRU
from bptvlm.server.config import Settings
from bptvlm.shared.tensors import encode_request

TOK, TOK2 = {"Authorization": "Bearer tok"}, {"Authorization": "Bearer tok2"}
W = 32


def _inputs(pop: int = 2, n: int = 4, names: tuple[str, ...] = ("a.", "b.")) -> dict[str, np.ndarray]:
    return {"text_context": np.zeros((pop, 4, W), np.float32), "images": np.zeros((n, 32, 32, 3), np.uint8),
            "labels": np.arange(n) % len(names), "class_names": np.array(list(names), dtype=object)}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", api_keys=("tok", "tok2"), max_response_bytes=20_000, ready_probe_s=0,
                        max_body_bytes=4_000_000)
    with TestClient(create_app(settings, service=build_service(settings)), headers=TOK) as c:
        yield c


def _post(c: TestClient, inputs: dict, path: str = "infer", headers: dict | None = None, **kw: object):
    body, h = encode_request(inputs, **kw)  # type: ignore[arg-type]
    return c.post(f"/v2/models/clip/{path}", content=body, headers={**h, **(headers or {})})


def _charged(c: TestClient, headers: dict = TOK) -> int:
    return c.get("/v2/usage", headers=headers).json()["usage"]["candidates"]


def _raw(c: TestClient, body: bytes, headers: dict | None = None, path: str = "infer"):
    return c.post(f"/v2/models/clip/{path}", content=body, headers={"Content-Type": "application/json", **(headers or {})})


# --- 1. image preprocessing ---------------------------------------------------------------------

THIN = {
    "thin-upload": ("images", np.zeros((1, 4000, 1, 3), np.uint8), 422, "aspect ratio over 16"),
    "wide-inline": ("infer", np.zeros((1, 1, 4000, 3), np.uint8), 422, "aspect ratio over 16"),
    "huge-side": ("images", np.zeros((1, 4100, 300, 3), np.uint8), 413, "at most 4096 per side"),
}


@pytest.mark.parametrize("path, images, status, message", THIN.values(), ids=THIN.keys())
def test_thin_and_huge_images_are_refused_before_preprocessing(client: TestClient, path: str, images: np.ndarray,
                                                               status: int, message: str) -> None:
    start = time.monotonic()
    inputs = {"images": images} if path == "images" else _inputs(n=1) | {"images": images}
    r = _post(client, inputs, path, outputs=["loss"] if path == "infer" else ())
    assert r.status_code == status and message in r.json()["error"], r.text
    assert time.monotonic() - start < 2.0  # the old server spent seconds and gigabytes scaling it up


def test_uploads_are_preprocessed_inside_admission() -> None:
    with TestClient(create_app(Settings(device="cpu", api_keys=("tok",), request_timeout_s=0.5)), headers=TOK) as c:
        lock = c.app.state.service.admission._device
        lock.acquire()  # the model is busy: preprocessing must wait its turn like any forward
        try:
            r = _post(c, {"images": np.zeros((2, 32, 32, 3), np.uint8)}, "images")
        finally:
            lock.release()
        assert r.status_code == 504, r.text
        assert _post(c, {"images": np.zeros((2, 32, 32, 3), np.uint8)}, "images").status_code == 200


def test_a_big_upload_takes_one_turn_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from bptvlm.server import service as service_module

    with TestClient(create_app(Settings(device="cpu", api_keys=("tok",))), headers=TOK) as c:
        admission = c.app.state.service.admission
        turns = []
        real = admission.slot

        def counted():  # type: ignore[no-untyped-def]
            turns.append(1)
            return real()

        monkeypatch.setattr(service_module, "PREPROCESS_PIXELS", 32 * 32 * 2)  # two images a chunk
        monkeypatch.setattr(admission, "slot", counted)
        assert _post(c, {"images": np.ones((5, 32, 32, 3), np.uint8)}, "images").status_code == 200
        assert len(turns) == 3  # forwards can run between the chunks of a big upload


# --- 2. tokenizer and text-feature caches ---------------------------------------------------------


def test_huge_class_names_are_refused_before_tokenizing(client: TestClient) -> None:
    model = client.app.state.service.model
    before = model._token_ids.nbytes
    start = time.monotonic()
    r = _post(client, _inputs(names=("a" * 1_000_000, "b.")), outputs=["loss"])
    assert r.status_code == 413 and "element 0 has 1000000 bytes, at most 1000" in r.json()["error"]
    assert time.monotonic() - start < 2.0 and model._token_ids.nbytes == before


def test_byte_caps_count_keys_and_never_keep_an_entry_over_the_cap() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(100, len, len)
    assert lru.put("k" * 95, b"123456") is False and len(lru) == 0  # 101 bytes with its key
    assert lru.put("k", b"1" * 60) and lru.put("j", b"1" * 30) and lru.nbytes == 92
    lru.put("i", b"1" * 20)  # evicts the oldest
    assert "k" not in lru and lru.nbytes == 52


def test_text_feature_and_reply_caches_hold_their_caps() -> None:
    settings = Settings(device="cpu", api_keys=("tok",), text_cache_bytes=2_000, reply_cache_bytes=300)
    with TestClient(create_app(settings), headers=TOK) as c:
        service = c.app.state.service
        for i in range(5):
            names = tuple(f"class {i} {j}." for j in range(3))
            vision_only = {k: v for k, v in _inputs(names=names).items() if k != "text_context"}
            vision_only["visual_prompt"] = np.zeros((2, 1, W), np.float32)
            assert _post(c, vision_only, outputs=["logits"], request_id=f"r{i}").status_code == 200
            assert service.text_features.nbytes <= 2_000 and service.replies.cache.nbytes <= 300
        assert len(service.replies.cache) == 0  # each reply (logits [2, 4, 3] + 256) is over 300 bytes


# --- 3./4. the event loop and the thread pool ----------------------------------------------------


def test_decoding_and_encoding_run_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    on_loop: list[bool] = []

    def spy(real):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bodies, "decode_request", spy(bodies.decode_request))
    monkeypatch.setattr(routes, "encode_response", spy(routes.encode_response))
    assert _post(client, _inputs(), outputs=["loss"]).status_code == 200
    assert on_loop == [False, False]


def test_health_answers_and_the_queue_refuses_while_requests_wait_for_the_model() -> None:
    queued = 45  # more than anyio's 40 shared threads
    settings = Settings(device="cpu", api_keys=("tok",), max_queue=queued, request_timeout_s=30, ready_probe_s=0)
    with TestClient(create_app(settings), headers=TOK) as c:
        admission = c.app.state.service.admission
        admission._device.acquire()
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(_post(c, _inputs(), outputs=["loss"]).status_code))
                   for _ in range(queued)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while admission.admitted < queued and time.monotonic() < deadline:
                time.sleep(0.02)
            assert admission.admitted == queued
            start = time.monotonic()
            assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
            assert time.monotonic() - start < 1.0
            refused = _post(c, _inputs(), outputs=["loss"])
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert f"{queued} requests are queued" in refused.json()["error"]
        finally:
            admission._device.release()
        for t in threads:
            t.join(30)
        assert results == [200] * queued


# --- 5. response size ----------------------------------------------------------------------------


def test_a_response_over_the_cap_is_413_before_any_work(client: TestClient) -> None:
    before = _charged(client)
    three = ("a.", "b.", "c.")
    r = _post(client, _inputs(pop=8, n=300, names=three), outputs=["logits"])
    assert r.status_code == 413
    assert "output 'logits' [P=8, N=300, C=3] = 7200 values would make a binary response" in r.json()["error"]
    assert "over the limit of 20000 bytes (--max-response-bytes)" in r.json()["error"]
    assert _charged(client) == before
    assert _post(client, _inputs(pop=8, n=300, names=three), outputs=["loss"]).status_code == 200  # loss is small


# --- 6. malformed input is a JSON 4xx -------------------------------------------------------------


def _json_body(**tensor: object) -> bytes:
    base = {"name": "class_names", "shape": [1], "datatype": "BYTES", "data": ["a."]}
    return json.dumps({"inputs": [base | tensor]}).encode()


MALFORMED = {
    "deep-nesting": b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 100_000
                    + b"1" + b"]" * 100_000 + b"}]}",
    "huge-declared-bytes": None,  # binary, built below
    "shape-0-by-2**62": _json_body(shape=[0, 2**62], data=[]),
    "shape-overflowing-int64": _json_body(shape=[2**70], data=[]),
    "class-names-shape-0": json.dumps({"inputs": [
        {"name": "class_names", "shape": [0], "datatype": "BYTES", "data": []},
        {"name": "images", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}]}).encode(),
    "lone-surrogate-class-name": _json_body(data=["\ud800"]).replace(b"\\ud800", b"\\ud800"),
    "lone-surrogate-context-init": json.dumps({"parameters": {"context_init": "\udc00"}, "inputs": []}).encode(),
    "lone-surrogate-request-id": json.dumps({"id": "\ud800", "inputs": []}).encode(),
}


def _huge_bytes_binary() -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "class_names", "shape": [10**9, 10**9], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    return head + b"\x00\x00\x00\x00", {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("case", MALFORMED.keys())
def test_malformed_bodies_are_json_4xx(client: TestClient, case: str) -> None:
    if case == "huge-declared-bytes":
        body, headers = _huge_bytes_binary()
        r = client.post("/v2/models/clip/infer", content=body, headers={**headers, "Content-Type": "application/octet-stream"})
    else:
        r = _raw(client, MALFORMED[case])
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json") and "error" in r.json()


def test_a_body_of_millions_of_bytes_elements_is_refused_before_unpacking(client: TestClient) -> None:
    head = json.dumps({"inputs": [{"name": "class_names", "shape": [500_000], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 2_000_000}}]}).encode()
    start = time.monotonic()
    r = client.post("/v2/models/clip/infer", content=head + b"\x00" * 2_000_000,
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 413 and "500000 BYTES elements, at most 1000" in r.json()["error"]
    assert time.monotonic() - start < 1.0


# --- 9. the smaller items ------------------------------------------------------------------------


def test_non_finite_outputs_are_refused_and_not_charged(client: TestClient) -> None:
    before = _charged(client)
    r = _post(client, _inputs() | {"text_context": np.full((2, 4, W), 3e38, np.float32)}, outputs=["logits"],
              binary=False)
    assert r.status_code == 422 and "NaN or infinite (finite inputs overflowed)" in r.json()["error"]
    assert _charged(client) == before


def test_uploads_and_batch_ids_are_scoped_per_key(client: TestClient) -> None:
    images = np.random.default_rng(13).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    first = _post(client, {"images": images}, "images").json()
    assert first["cached"] is False
    other = _post(client, {"images": images}, "images", headers=TOK2).json()
    assert other["cached"] is False  # nothing tells key 2 that key 1 uploaded the same pixels
    assert _post(client, {"images": images}, "images").json()["cached"] is True
    ref = {"image_batch": np.array([first["image_batch"].encode()], dtype=object)}
    mine = _inputs() | ref
    del mine["images"]
    mine["labels"] = np.array([0, 1])
    assert _post(client, mine, outputs=["loss"]).status_code == 200
    client.app.state.service.images.lru.capacity_bytes  # noqa: B018 (the store is shared, the scopes are not)
    fresh = np.random.default_rng(14).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    theirs = _post(client, {"images": fresh}, "images", headers=TOK2).json()["image_batch"]
    mine["image_batch"] = np.array([theirs.encode()], dtype=object)
    r = _post(client, mine, outputs=["loss"])
    assert r.status_code == 404 and "never uploaded by this key" in r.json()["error"]


def test_budget_429_tells_what_remains() -> None:
    with TestClient(create_app(Settings(device="cpu", api_keys=("tok",), quota=5)), headers=TOK) as c:
        assert _post(c, _inputs(pop=3), outputs=["loss"]).headers["X-Query-Budget-Remaining"] == "2"
        refused = _post(c, _inputs(pop=3), outputs=["loss"])
        assert refused.status_code == 429 and refused.headers["X-Query-Budget-Remaining"] == "2"


def test_compressed_bodies_are_inflated_under_the_cap(client: TestClient) -> None:
    body, headers = encode_request(_inputs(), outputs=["loss"])
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = client.post("/v2/models/clip/infer", content=packed, headers={**headers, "Content-Encoding": encoding})
        assert r.status_code == 200, (encoding, r.text)
    bomb = gzip.compress(b"\x00" * 5_000_000)  # 5 MB out of a few KB, over the 4 MB body limit
    r = client.post("/v2/models/clip/infer", content=bomb, headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "inflates to over the limit of 4000000 bytes" in r.json()["error"]
    r = client.post("/v2/models/clip/infer", content=body, headers={**headers, "Content-Encoding": "br"})
    assert r.status_code == 415 and "identity, gzip or deflate" in r.json()["error"]
    r = client.post("/v2/models/clip/infer", content=b"not gzip", headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "cannot be inflated" in r.json()["error"]


def test_a_request_id_past_the_reply_ttl_is_a_new_request() -> None:
    settings = Settings(device="cpu", api_keys=("tok",), reply_ttl_s=0.3)
    with TestClient(create_app(settings), headers=TOK) as c:
        assert _post(c, _inputs(pop=3), outputs=["loss"], request_id="gen-1").status_code == 200
        again = _post(c, _inputs(pop=3), outputs=["loss"], request_id="gen-1")
        assert again.headers.get("X-Idempotent-Replay") == "true" and _charged(c) == 3
        time.sleep(0.4)
        late = _post(c, _inputs(pop=3), outputs=["loss"], request_id="gen-1")
        assert late.status_code == 200 and "X-Idempotent-Replay" not in late.headers
        assert _charged(c) == 6  # no free recomputation once the reply is gone
