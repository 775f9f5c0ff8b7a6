"""client/fanout.py in-process: populations split over fake endpoints, merged in order, failures moved."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from bptvlm.client.api import ClipClient
from bptvlm.client.config import resolve_config
from bptvlm.client.data import FewShotData
from bptvlm.client.fanout import FanoutClient, apportion, client_for, split_endpoints
from bptvlm.client.run import start
from bptvlm.shared import protocol as p
from bptvlm.shared.errors import InvalidTensorError, ProtocolError

from .conftest import FakeServer


def _client(server: Any, name: str, **kw: Any) -> ClipClient:
    return ClipClient(f"http://{name}", transport=httpx.MockTransport(server), sleep=lambda s: None, **kw)


def _data(seed: int = 0) -> FewShotData:
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 3

    return FewShotData(["red", "green", "blue"], *split(9), *split(6), *split(6))


@pytest.mark.parametrize("population, weights, expected", [
    (30, [1, 1], [15, 15]), (30, [2, 1], [20, 10]), (7, [1, 1, 1], [3, 2, 2]), (1, [1, 3], [0, 1]),
    (30, [1e-9, 1], [0, 30]),
], ids=["equal", "two-to-one", "remainders", "one-candidate", "a-slow-one"])
def test_apportion_is_proportional_and_exact(population: int, weights: list[float], expected: list[int]) -> None:
    assert apportion(population, weights) == expected


def test_endpoint_lists_are_checked() -> None:
    assert split_endpoints("http://a,http://b") == ["http://a", "http://b"]
    with pytest.raises(ValueError, match="empty URL"):
        split_endpoints("http://a,")
    assert isinstance(client_for("http://a"), ClipClient)
    with pytest.raises(ValueError, match="given twice"):
        FanoutClient([ClipClient("http://a"), ClipClient("http://a")])


def test_a_population_comes_back_in_candidate_order_and_both_endpoints_are_charged() -> None:
    one, a, b = FakeServer(), FakeServer(), FakeServer()
    images = np.zeros((3, 8, 8, 3), np.uint8)
    ctx = np.random.default_rng(0).normal(0, 0.1, (30, 1, 6)).astype(np.float32)
    with _client(one, "one") as single, FanoutClient([_client(a, "a"), _client(b, "b")]) as fan:
        inputs = {p.TEXT_CONTEXT: ctx, p.LABELS: np.arange(3), p.CLASS_NAMES: np.array([b"x.", b"y.", b"z."], object)}
        expected = single.infer({**inputs, p.IMAGE_BATCH: np.array([single.upload_images(images).encode()], object)},
                                outputs=(p.LOSS, p.LOGITS))
        got = fan.infer({**inputs, p.IMAGE_BATCH: np.array([fan.upload_images(images).encode()], object)},
                        outputs=(p.LOSS, p.LOGITS), request_id="run-g1")
        np.testing.assert_array_equal(got.loss, expected.loss)
        np.testing.assert_array_equal(got.logits, expected.logits)
        assert (a.candidates, b.candidates) == (15, 15) and got.usage.candidates == 30 == fan.usage.candidates
        ids = sorted(req.id for req, _ in a.infer_bodies + b.infer_bodies)
        assert ids == ["run-g1@0-15", "run-g1@15-30"]
        assert [r["candidates"] for r in fan.report()] == [15, 15]


def test_a_failing_endpoint_s_share_goes_to_the_other_under_the_same_id() -> None:
    a, b = FakeServer(), FakeServer()
    calls = {"n": 0}

    def b_transport(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/infer"):
            calls["n"] += 1
            raise httpx.ConnectError("connection refused", request=request)
        return b(request)

    images = np.zeros((3, 8, 8, 3), np.uint8)
    with FanoutClient([_client(a, "a"), _client(b_transport, "b", max_retries=1)], cooldown_s=60) as fan:
        batch = np.array([fan.upload_images(images).encode()], object)
        inputs = {p.TEXT_CONTEXT: np.zeros((10, 1, 6), np.float32), p.IMAGE_BATCH: batch, p.LABELS: np.arange(3),
                  p.CLASS_NAMES: np.array([b"x.", b"y.", b"z."], object)}
        result = fan.infer(inputs, request_id="g1")
        assert result.loss is not None and result.loss.shape == (10,) and a.candidates == 10
        assert sorted(req.id for req, _ in a.infer_bodies) == ["g1@0-5", "g1@5-10"]  # b's share, its id kept
        report = fan.report()
        assert report[1]["failures"] == 1 and "ConnectError" in report[1]["last_error"]
        fan.infer(inputs, request_id="g2")  # b is cooling down: a takes everything at once
        assert a.candidates == 20 and calls["n"] == 2  # b was tried twice (its client's one retry), then no more


def test_a_bad_request_is_raised_not_moved() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/infer"):
            return httpx.Response(422, json={"error": "input 'text_context': bad shape"})
        return FakeServer()(request)

    with FanoutClient([_client(refuse, "a"), _client(refuse, "b")]) as fan:
        batch = np.array([fan.upload_images(np.zeros((1, 8, 8, 3), np.uint8)).encode()], object)
        with pytest.raises(InvalidTensorError, match="bad shape"):
            fan.infer({p.TEXT_CONTEXT: np.zeros((4, 1, 6), np.float32), p.IMAGE_BATCH: batch, p.LABELS: np.arange(1),
                       p.CLASS_NAMES: np.array([b"x."], object)})


def test_endpoints_serving_different_models_are_refused() -> None:
    other = FakeServer()
    other.metadata = lambda: {**FakeServer().metadata(), "parameters": {**FakeServer().metadata()["parameters"],  # type: ignore[method-assign]
                                                                        "model_id": "another-clip"}}
    with FanoutClient([_client(FakeServer(), "a"), _client(other, "b")]) as fan:
        with pytest.raises(ProtocolError, match="different models"):
            fan.model_metadata()


def test_a_tuning_run_over_two_endpoints_equals_one_at_the_papers_sizes() -> None:
    """The paper's preset (CMA-ES, popsize 30, 500 + 500 dims, joint): same losses, same prompts."""
    config = resolve_config("paper", budget=120, eval_every=0)
    with _client(FakeServer(), "one") as single:
        alone = start(single, _data(), config, None, progress=False)
    a, b = FakeServer(), FakeServer()
    with FanoutClient([_client(a, "a"), _client(b, "b")]) as fan:
        fanned = start(fan, _data(), config, None, progress=False)
    assert fanned.summary["best_train_loss"] == alone.summary["best_train_loss"]
    assert fanned.summary["train_queries"] == 120 == alone.summary["train_queries"]
    for name, tensor in alone.prompts.items():
        np.testing.assert_array_equal(fanned.prompts[name], tensor)
    shares = fanned.summary["endpoints"]
    assert [s["endpoint"] for s in shares] == ["http://a", "http://b"] and all(s["candidates"] > 0 for s in shares)
    assert a.candidates + b.candidates == fanned.summary["train_queries"] + fanned.summary["eval_queries"]
    assert sum(s["usage"]["candidates"] for s in shares) == a.candidates + b.candidates
