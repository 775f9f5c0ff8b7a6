"""The HTTP surface: V2 routes, binary and JSON bodies, and every rejection with its message."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.shared import protocol as p
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

W = 32  # text and vision width of the tiny model
NAMES = np.array(["dog.", "cat.", "car."], dtype=object)
LABELS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


def _images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", api_keys=("k-good", "k-small"), max_population=64, max_images=50,
                        max_body_bytes=2_000_000)
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k-good"}) as c:
        yield c


def _post(client: TestClient, inputs: dict, *, binary: bool = True, outputs: tuple = ("loss",), **kw):
    body, headers = encode_request(inputs, outputs=outputs, binary=binary, **kw)
    return client.post("/v2/models/clip/infer", content=body, headers=headers)


def _valid(pop: int = 4) -> dict[str, np.ndarray]:
    return {"text_context": np.zeros((pop, 4, W), np.float32), "images": _images(), "labels": LABELS,
            "class_names": NAMES}


def test_health_and_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/clip").json()
    assert {t["name"] for t in meta["inputs"]} >= {"text_context", "visual_prompt", "images", "labels"}
    assert meta["parameters"]["prompt"]["text_width"] == W


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_returns_only_loss_and_logits(client: TestClient, binary: bool) -> None:
    inputs = _valid() | {"visual_prompt": np.zeros((4, 2, W), np.float32)}
    r = _post(client, inputs, binary=binary, outputs=("loss", "logits"), parameters={"context_init": "a photo of a"})
    assert r.status_code == 200, r.text
    response, arrays = decode_response(r.content, r.headers.get(HEADER_LENGTH))
    assert set(arrays) == {"loss", "logits"}
    assert arrays["loss"].shape == (4,) and arrays["logits"].shape == (4, 6, 3)
    assert set(response.parameters or {}) == {"usage", "usage_total"}
    assert response.parameters["usage"] == {"candidates": 4, "requests": 1, "image_forwards": 24}


def test_uploaded_batch_equals_inline(client: TestClient) -> None:
    body, headers = encode_request({"images": _images()})
    up = client.post("/v2/models/clip/images", content=body, headers=headers).json()
    again = client.post("/v2/models/clip/images", content=body, headers=headers).json()
    assert up["num_images"] == 6 and again == up | {"cached": True}
    by_id = _valid() | {"image_batch": np.array([up["image_batch"]], dtype=object)}
    del by_id["images"]
    a, b = _post(client, _valid()), _post(client, by_id)
    loss_a = decode_response(a.content, a.headers.get(HEADER_LENGTH))[1]["loss"]
    loss_b = decode_response(b.content, b.headers.get(HEADER_LENGTH))[1]["loss"]
    np.testing.assert_array_equal(loss_a, loss_b)


def test_zero_context_with_context_init_is_the_template(client: TestClient) -> None:
    templated = {"images": _images(), "class_names": np.array([f"a photo of a {n}" for n in NAMES], dtype=object)}
    r0 = _post(client, templated, outputs=("logits",))
    r1 = _post(client, {"text_context": np.zeros((1, 4, W), np.float32), "images": _images(), "class_names": NAMES},
               outputs=("logits",), parameters={"context_init": "a photo of a"})
    l0 = decode_response(r0.content, r0.headers.get(HEADER_LENGTH))[1]["logits"]
    l1 = decode_response(r1.content, r1.headers.get(HEADER_LENGTH))[1]["logits"]
    np.testing.assert_allclose(l0, l1, atol=1e-4)


def test_per_class_context_equal_rows_is_the_shared_context(client: TestClient) -> None:
    shared = np.random.default_rng(0).standard_normal((2, 4, W)).astype(np.float32) * 0.02
    per_class = np.repeat(shared[:, None], len(NAMES), axis=1)  # [P, C, n, D], every class the same
    logits = []
    for ctx in (shared, per_class):
        r = _post(client, {"text_context": ctx, "images": _images(), "class_names": NAMES}, outputs=("logits",),
                  parameters={"context_init": "a photo of a"})
        assert r.status_code == 200, r.text
        logits.append(decode_response(r.content, r.headers.get(HEADER_LENGTH))[1]["logits"])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


def test_tokenize_counts_tokens_and_charges_nothing(client: TestClient, tiny_model) -> None:
    texts = ["a photo of a", "a photo of", ""]
    charged = client.get("/v2/usage").json()["usage"]["candidates"]
    r = client.post("/v2/models/clip/tokenize", json={"texts": texts})
    assert r.status_code == 200
    assert r.json()["num_tokens"] == [len(ids) for ids in tiny_model.tokenize(texts).token_ids]
    assert r.json()["num_tokens"][2] == 0
    assert client.get("/v2/usage").json()["usage"]["candidates"] == charged
    r = client.post("/v2/models/clip/tokenize", json={"texts": []})
    assert r.status_code == 422 and "texts" in r.json()["error"]
    r = client.post("/v2/models/clip/tokenize", json={"text": "a photo of a"})
    assert r.status_code == 422 and "text" in r.json()["error"]
    r = client.post("/v2/models/clip/tokenize", json={"texts": ["x" * (p.MAX_TOKENIZE_CHARS + 1)]})
    assert r.status_code == 422 and "texts.0" in r.json()["error"]
    r = client.post("/v2/models/clip/tokenize", json={"texts": ["x " * 500] * 1024})  # ~1 MB, limit 2 MB: fine
    assert r.status_code == 200
    r = client.post("/v2/models/clip/tokenize", json={"texts": ["x " * 499] * 1024 * 3})
    assert r.status_code == 413


def _drop(name: str) -> dict:
    inputs = _valid()
    del inputs[name]
    return inputs


BAD_TENSORS = {
    "context-width": (_valid() | {"text_context": np.zeros((4, 4, W + 1), np.float32)}, 422,
                      "input 'text_context': expected [P >= 1, n <= 29, 32], received FP32 [4, 4, 33]"),
    "context-dtype": (_valid() | {"text_context": np.zeros((4, 4, W), np.float64)}, 422,
                      "input 'text_context': expected FP32 or FP16 with 3 or 4 dimensions, received FP64"),
    "context-rank": (_valid() | {"text_context": np.zeros((4, W), np.float32)}, 422, "with 3 or 4 dimensions, received FP32 [4, 32]"),
    "per-class-context-classes": (_valid() | {"text_context": np.zeros((4, 2, 4, W), np.float32)}, 422,
                                  "a class-specific context [P, C, n, D] needs C = 3 (one per class name), received FP32 [4, 2, 4, 32]"),
    "per-class-context-width": (_valid() | {"text_context": np.zeros((4, 3, 4, W - 1), np.float32)}, 422,
                                "input 'text_context': expected [P >= 1, C, n <= 29, 32], received FP32 [4, 3, 4, 31]"),
    "context-nan": (_valid() | {"text_context": np.full((4, 4, W), np.nan, np.float32)}, 422,
                    "input 'text_context': 512 values are NaN or infinite"),
    "prompt-inf": (_valid() | {"visual_prompt": np.full((4, 1, W), np.inf, np.float32)}, 422,
                   "input 'visual_prompt': 128 values are NaN or infinite"),
    "population-mismatch": (_valid() | {"visual_prompt": np.zeros((3, 1, W), np.float32)}, 422,
                            "disagree on the population: [3, 4]"),
    "too-many-prompt-tokens": (_valid() | {"visual_prompt": np.zeros((4, 65, W), np.float32)}, 422, "n <= 64"),
    "images-channels": (_valid() | {"images": np.zeros((6, 32, 32, 4), np.uint8)}, 422,
                        "input 'images': expected UINT8 [N >= 1, H, W, 3], received UINT8 [6, 32, 32, 4]"),
    "images-dtype": (_valid() | {"images": np.zeros((6, 32, 32, 3), np.float32)}, 422, "input 'images': expected UINT8"),
    "no-images": (_drop("images"), 422, "give exactly one of 'images' (inline) or 'image_batch'"),
    "labels-count": (_valid() | {"labels": LABELS[:5]}, 422, "input 'labels': expected [6] (one per image), received INT64 [5]"),
    "label-unknown-class": (_valid() | {"labels": np.array([0, 1, 2, 3, 0, 1])}, 422,
                            "label 3 at index 3 is not a class index in [0, 3)"),
    "no-class-names": (_drop("class_names"), 422, "input 'class_names' (BYTES [C]) is required"),
    "empty-class-name": (_valid() | {"class_names": np.array(["dog.", " ", "car."], dtype=object)}, 422,
                         "input 'class_names': element 1 is empty"),
    "class-name-too-long": (_valid() | {"class_names": np.array(["dog " * 40, "cat.", "car."], dtype=object)}, 422,
                            "class text 0 needs 46 positions with 4 context vectors; the model has 32"),
    "unknown-input": (_valid() | {"weights": np.zeros(2, np.float32)}, 422, "unknown input 'weights'"),
    "loss-without-labels": (_drop("labels"), 422, "output 'loss' needs the input 'labels'"),
    "population-limit": (_valid(65), 413, "population 65 is over the limit of 64"),
    "image-limit": (_valid() | {"images": np.zeros((51, 8, 8, 3), np.uint8), "labels": np.zeros(51, np.int64)}, 413,
                    "51 images, at most 50 per batch"),
}


@pytest.mark.parametrize(("inputs", "status", "message"), BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_bad_tensors_are_named(client: TestClient, inputs: dict, status: int, message: str) -> None:
    r = _post(client, inputs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_add_prompt_needs_one_vector_per_position(client: TestClient) -> None:
    lim = p.PromptLimits.model_validate(client.get("/v2/models/clip").json()["parameters"]["prompt"])
    positions = p.vision_positions(lim)
    bad = _valid() | {"visual_prompt": np.zeros((4, 3, lim.vision_width), np.float32)}
    r = _post(client, bad, parameters={"visual_prompt_position": "add"})
    assert r.status_code == 422
    assert f"visual_prompt_position 'add' needs one vector per vision position ({positions}" in r.json()["error"]
    good = _valid() | {"visual_prompt": np.zeros((4, positions, lim.vision_width), np.float32)}
    assert _post(client, good, parameters={"visual_prompt_position": "add"}).status_code == 200
    # appended prompts keep their own cap, even where 'add' needs more vectors than it
    service = client.app.state.service
    saved = service.limits
    try:
        service.limits = saved.model_copy(update={"max_visual_prompt": positions - 1})
        r = _post(client, good, parameters={"visual_prompt_position": "pre_ln"})
        assert r.status_code == 422 and f"at most {positions - 1} appended tokens" in r.json()["error"]
        assert _post(client, good, parameters={"visual_prompt_position": "add"}).status_code == 200
    finally:
        service.limits = saved


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"loss": "hinge"}, "parameter 'loss' must be 'ce' or 'focal', received 'hinge'"),
        ({"focal_gamma": "x"}, "parameter 'focal_gamma' must be a number"),
        ({"visual_prompt_position": "middle"}, "must be 'pre_ln', 'post_ln' or 'add'"),
        ({"context_init": "a very long photo of a nice"}, "has 14 tokens, more than the 4 context vectors"),
        ({"temperature": 2}, "unknown request parameter 'temperature'"),
    ],
    ids=["loss", "gamma", "placement", "context-init-long", "unknown"],
)
def test_bad_parameters(client: TestClient, parameters: dict, message: str) -> None:
    r = _post(client, _valid(), parameters=parameters)
    assert r.status_code == 400 and message in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", {}, 400, "body is not valid JSON"),
        (b"[1, 2]", {}, 400, "JSON body must be an object"),
        (b'{"inputs": 3}', {}, 400, "invalid inference request: inputs"),
        (b'{"inputs": []}xx', {HEADER_LENGTH: "99"}, 400, "Inference-Header-Content-Length is 99 but the body has 16"),
        (json.dumps({"inputs": [{"name": "labels", "shape": [2], "datatype": "INT64",
                                 "parameters": {"binary_data_size": 16}}]}).encode(), {HEADER_LENGTH: "0"}, 400,
         "Inference-Header-Content-Length is 0"),
        (b"x" * 2_000_001, {}, 413, "over the limit of 2000000 bytes"),
    ],
    ids=["not-json", "not-object", "schema", "header-length", "zero-header", "too-large"],
)
def test_bad_bodies(client: TestClient, body: bytes, headers: dict, status: int, message: str) -> None:
    r = client.post("/v2/models/clip/infer", content=body, headers=headers)
    assert r.status_code == status and message in r.json()["error"]


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x" * 100_000

    r = client.post("/v2/models/clip/infer", content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_auth_unknown_model_and_budget() -> None:
    settings = Settings(device="cpu", api_keys=("k1",), quota=6)
    with TestClient(create_app(settings)) as c:
        assert c.get("/v2/health/ready").status_code == 200  # health is public
        r = c.get("/v2/models/clip")
        assert r.status_code == 401 and "missing API key" in r.json()["error"]
        r = c.get("/v2/models/clip", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"] == "unknown API key"
        assert c.post("/v2/models/clip/tokenize", json={"texts": ["a"]}).status_code == 401
        c.headers["Authorization"] = "Bearer k1"
        r = c.get("/v2/models/other")
        assert r.status_code == 404 and "model 'other' is not served here; this server serves 'clip'" in r.json()["error"]
        assert _post(c, _valid(4)).headers["X-Query-Budget-Remaining"] == "2"
        r = _post(c, _valid(4))
        assert r.status_code == 429 and "Retry-After" not in r.headers
        assert "needs 4 candidates, 2 of the key's 6 remain" in r.json()["error"]
        assert _post(c, _valid(2)).status_code == 200  # a refused request charged nothing
        assert _post(c, _valid(1)).status_code == 429
        report = c.get("/v2/usage").json()
        assert report == {"usage": {"candidates": 6, "requests": 2, "image_forwards": 6}, "remaining": 0}


def test_unknown_image_batch_is_404(client: TestClient) -> None:
    inputs = _drop("images") | {"image_batch": np.array(["sha256:feed"], dtype=object)}
    r = _post(client, inputs)
    assert r.status_code == 404 and "image_batch 'sha256:feed' is not stored here" in r.json()["error"]


def test_not_ready_is_503() -> None:
    app = create_app(Settings(device="cpu"))
    with TestClient(app) as c:
        app.state.service = None  # as while the model loads
        assert c.get("/v2/health/ready").status_code == 503
        r = c.get("/v2/models/clip")
        assert r.status_code == 503 and r.json()["error"] == "the model is still loading"
        assert r.headers["Retry-After"] == "1"
