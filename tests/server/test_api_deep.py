"""Deep prompts over HTTP: published in the metadata, scored per candidate, and every malformed one refused."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.shared import protocol as p
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

W = 32  # text and vision width of the tiny model (2 layers per tower: deep prompts for layer 1)
NAMES = np.array(["dog.", "cat.", "car."], dtype=object)
LABELS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(device="cpu", max_population=64, max_images=50, max_body_bytes=2_000_000)
    with TestClient(create_app(settings)) as c:
        yield c


def _post(client: TestClient, inputs: dict, **kw):
    body, headers = encode_request(inputs, outputs=("loss",), binary=True, **kw)
    return client.post("/v2/models/clip/infer", content=body, headers=headers)


def _inputs(pop: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"text_context": rng.normal(0, 0.05, (pop, 4, W)).astype(np.float32),
            "visual_prompt": rng.normal(0, 1, (pop, 2, W)).astype(np.float32),
            p.TEXT_DEEP_PROMPT: rng.normal(0, 1, (pop, 1, 4, W)).astype(np.float32),
            p.VISUAL_DEEP_PROMPT: rng.normal(0, 1, (pop, 1, 2, W)).astype(np.float32),
            "images": np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
            "labels": LABELS, "class_names": NAMES}


def _loss(client: TestClient, inputs: dict, **kw) -> np.ndarray:
    r = _post(client, inputs, **kw)
    assert r.status_code == 200, r.text
    return decode_response(r.content, r.headers.get(HEADER_LENGTH))[1]["loss"]


def test_metadata_lists_deep_inputs_and_per_layer_stats(client: TestClient) -> None:
    meta = client.get("/v2/models/clip").json()
    shapes = {t["name"]: t["shape"] for t in meta["inputs"]}
    assert shapes[p.TEXT_DEEP_PROMPT] == [-1, 1, -1, W] and shapes[p.VISUAL_DEEP_PROMPT] == [-1, 1, -1, W]
    prompt = meta["parameters"]["prompt"]
    assert prompt["text_layers"] == prompt["vision_layers"] == 2
    assert len(prompt["text_hidden_std"]) == len(prompt["vision_hidden_std"]) == 2
    assert min(prompt["text_hidden_std"] + prompt["vision_hidden_std"]) > 0


@pytest.mark.parametrize("placement", ["pre_ln", "post_ln"])
def test_deep_population_equals_one_at_a_time_and_deep_matters(client: TestClient, placement: str) -> None:
    inputs = _inputs()
    params = {"visual_prompt_position": placement}
    together = _loss(client, inputs, parameters=params)
    for i in range(3):
        one = {k: (v[i : i + 1] if k in (*p.INPUT_NAMES[:2], p.TEXT_DEEP_PROMPT, p.VISUAL_DEEP_PROMPT) else v)
               for k, v in inputs.items()}
        np.testing.assert_allclose(together[i], _loss(client, one, parameters=params)[0], atol=1e-5)
    shallow = {k: v for k, v in inputs.items() if k not in (p.TEXT_DEEP_PROMPT, p.VISUAL_DEEP_PROMPT)}
    assert not np.allclose(_loss(client, shallow, parameters=params), together, atol=1e-4)


def test_deep_text_prompt_with_a_per_class_context(client: TestClient) -> None:
    inputs = _inputs()
    inputs["text_context"] = np.repeat(inputs["text_context"][:, None], 3, axis=1)  # equal rows: the shared context
    np.testing.assert_allclose(_loss(client, inputs), _loss(client, _inputs()), atol=1e-5)


def _bad(**changes: np.ndarray | None) -> dict:
    inputs = _inputs()
    for k, v in changes.items():
        if v is None:
            inputs.pop(k)
        else:
            inputs[k] = v
    return inputs


CASES = {
    "too_many_layers": (_bad(text_deep_prompt=np.zeros((3, 2, 4, W), np.float32)), {}, "1 <= layers <= 1"),
    "no_layers": (_bad(visual_deep_prompt=np.zeros((3, 0, 2, W), np.float32)), {}, "1 <= layers <= 1"),
    "wrong_length": (_bad(text_deep_prompt=np.zeros((3, 1, 3, W), np.float32)), {}, "n=4"),
    "wrong_width": (_bad(visual_deep_prompt=np.zeros((3, 1, 2, W + 1), np.float32)), {}, f"n=2, {W}]"),
    "wrong_population": (_bad(text_deep_prompt=np.zeros((2, 1, 4, W), np.float32)), {}, "P=3"),
    "wrong_rank": (_bad(text_deep_prompt=np.zeros((3, 4, W), np.float32)), {}, "with 4 dimensions"),
    "no_shallow": (_bad(visual_prompt=None), {}, "needs the shallow prompt 'visual_prompt'"),
    "non_finite": (_bad(text_deep_prompt=np.full((3, 1, 4, W), np.nan, np.float32)), {}, "NaN or infinite"),
    "add_placement": (_bad(visual_prompt=np.zeros((3, 17, W), np.float32)), {"visual_prompt_position": "add"}, "'add'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_deep_prompts_are_refused_with_what_was_wrong(client: TestClient, case: str) -> None:
    inputs, params, message = CASES[case]
    r = _post(client, inputs, parameters=params)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert message in error, error
    if case != "no_shallow" and case != "add_placement":
        name = p.VISUAL_DEEP_PROMPT if "visual_deep_prompt" in error.split(":")[0] else p.TEXT_DEEP_PROMPT
        assert f"input '{name}'" in error


def test_deep_prompt_mode_add_with_zero_prompts_is_the_shallow_request(client: TestClient) -> None:
    inputs = _inputs()
    zeros = {**inputs, p.TEXT_DEEP_PROMPT: np.zeros_like(inputs[p.TEXT_DEEP_PROMPT]),
             p.VISUAL_DEEP_PROMPT: np.zeros_like(inputs[p.VISUAL_DEEP_PROMPT])}
    shallow = {k: v for k, v in inputs.items() if k not in (p.TEXT_DEEP_PROMPT, p.VISUAL_DEEP_PROMPT)}
    np.testing.assert_array_equal(_loss(client, zeros, parameters={p.PARAM_DEEP_PROMPT_MODE: "add"}), _loss(client, shallow))
    r = _post(client, inputs, parameters={p.PARAM_DEEP_PROMPT_MODE: "sum"})
    assert r.status_code == 400 and "'deep_prompt_mode' must be 'replace' or 'add'" in r.json()["error"]
