"""Each reliability promise with its status code and message: idempotency, rate limits, overload,
timeouts, out-of-memory recovery, readiness, metrics and logs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.server.observability import JsonFormatter
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

AUTH = {"Authorization": "Bearer tok"}


def _body(pop: int = 3, request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    inputs = {"text_context": np.zeros((pop, 4, 32), np.float32), "images": np.zeros((4, 32, 32, 3), np.uint8),
              "labels": np.array([0, 1, 0, 1]), "class_names": np.array(["a.", "b."], dtype=object)}
    return encode_request(inputs, outputs=["loss"], request_id=request_id)


def _client(**overrides: object) -> TestClient:
    return TestClient(create_app(Settings(device="cpu", api_keys=("tok",), **overrides)), headers=AUTH)


def _post(c: TestClient, pop: int = 3, request_id: str | None = None):
    body, headers = _body(pop, request_id)
    return c.post("/v2/models/clip/infer", content=body, headers=headers)


def _total(c: TestClient) -> int:
    return c.get("/v2/usage").json()["usage"]["candidates"]


def test_a_retried_request_id_is_answered_once_and_charged_once() -> None:
    with _client() as c:
        first, again = _post(c, 3, "gen-7"), _post(c, 3, "gen-7")
        assert first.status_code == again.status_code == 200
        assert again.headers["X-Idempotent-Replay"] == "true" and "X-Idempotent-Replay" not in first.headers
        loss = [decode_response(r.content, r.headers.get(HEADER_LENGTH))[1]["loss"] for r in (first, again)]
        np.testing.assert_array_equal(*loss)
        assert _total(c) == 3
        assert _post(c, 3, "gen-8").status_code == 200 and _total(c) == 6  # a new id is a new query


def test_concurrent_duplicates_are_charged_once() -> None:
    with _client() as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(c, 5, "same"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 4
        assert _total(c) == 5


def test_rate_limit_is_429_with_retry_after() -> None:
    with _client(requests_per_minute=2) as c:
        ok = _post(c)
        assert ok.status_code == 200 and ok.headers["X-RateLimit-Limit"] == "2"
        assert ok.headers["X-RateLimit-Remaining"] == "1"
        _post(c)
        limited = _post(c)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"] == "rate limit: 2 requests per minute for this key"
        assert _total(c) == 6  # the limited request was not charged


def test_budget_header_and_exhaustion_without_retry_after() -> None:
    with _client(quota=5) as c:
        assert _post(c, 3).headers["X-Query-Budget-Remaining"] == "2"
        refused = _post(c, 3)
        assert refused.status_code == 429 and "Retry-After" not in refused.headers
        assert refused.json()["error"] == "query budget exhausted: this request needs 3 candidates, 2 of the key's 5 remain"


@pytest.fixture()
def held() -> Iterator[TestClient]:
    """A server whose model is busy (its device lock held by the test)."""
    with _client(max_queue=1, request_timeout_s=1.0) as c:
        lock = c.app.state.service.admission._device
        lock.acquire()
        try:
            yield c
        finally:
            lock.release()


def test_full_queue_is_a_fast_503(held: TestClient) -> None:
    waiting = threading.Thread(target=lambda: _post(held))
    waiting.start()
    deadline = time.monotonic() + 5
    while held.app.state.service.admission.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    r = _post(held)
    assert time.monotonic() - start < 0.5
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"] == "server overloaded: 1 requests are queued; retry later"
    waiting.join()


def test_waiting_too_long_is_504_and_uncharged(held: TestClient) -> None:
    r = _post(held)
    assert r.status_code == 504 and "waited 1.0 s for the model (limit 1 s)" in r.json()["error"]
    assert _total(held) == 0


def test_out_of_memory_halves_the_micro_batch_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    with _client(max_batch_images=64) as c:
        model = c.app.state.service.model
        real = model.encode_text

        def fits_only_small_batches(*args: object, **kwargs: object) -> torch.Tensor:
            if model.max_batch_images > 8:
                raise torch.OutOfMemoryError("simulated")
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "encode_text", fits_only_small_batches)
        assert _post(c).status_code == 200 and model.max_batch_images == 8


def test_persistent_out_of_memory_is_503_and_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    with _client(max_batch_images=4) as c:
        model = c.app.state.service.model
        real = model.encode_text
        monkeypatch.setattr(model, "encode_text", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
        r = _post(c)
        assert r.status_code == 503 and "out of memory even one image at a time" in r.json()["error"]
        assert c.get("/v2/health/ready").status_code == 503 and _total(c) == 0
        monkeypatch.setattr(model, "encode_text", real)
        assert _post(c).status_code == 200 and c.get("/v2/health/ready").status_code == 200


METRICS_TOKEN = "m" * 16


def test_metrics_count_requests_candidates_and_caches() -> None:
    with _client(metrics_token=METRICS_TOKEN) as c:
        _post(c, 3)
        _post(c, 4)
        c.get("/v2/models/nope")
        text = c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        assert 'bptvlm_requests_total{route="/v2/models/{model_name}/infer",status="200"} 2.0' in text
        assert 'bptvlm_requests_total{route="/v2/models/{model_name}",status="404"} 1.0' in text
        assert "bptvlm_candidates_charged_total{key=" in text and "} 7.0" in text
        assert "bptvlm_candidates_charged_all_total 7.0" in text
        assert 'bptvlm_cache_hits{cache="images"} 1.0' in text  # the second request reused the batch
        assert "bptvlm_inference_seconds_count 2.0" in text


@pytest.mark.parametrize("auth", [None, "Bearer tok", "Bearer " + "x" * 16], ids=["anonymous", "api-key", "wrong-token"])
def test_metrics_show_no_tenant_to_callers_without_the_metrics_token(auth: str | None) -> None:
    with _client(metrics_token=METRICS_TOKEN) as c:
        _post(c, 3)
        headers = {} if auth is None else {"Authorization": auth}
        text = TestClient(c.app).get("/metrics", headers=headers).text
        assert "bptvlm_candidates_charged_all_total 3.0" in text  # totals stay public
        assert "key=" not in text and "token-0" not in text


def test_request_ids_reach_the_response_and_json_logs(caplog: pytest.LogCaptureFixture) -> None:
    with _client() as c, caplog.at_level(logging.INFO, logger="bptvlm.access"):
        r = c.get("/v2/health/live", headers={"X-Request-ID": "abc-123"})
        assert r.headers["X-Request-ID"] == "abc-123"
    record = next(rec for rec in caplog.records if getattr(rec, "request_id", None) == "abc-123")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc-123" and line["status"] == 200 and line["path"] == "/v2/health/live"


def test_a_reused_id_with_another_body_is_refused() -> None:
    with _client() as c:
        assert _post(c, 3, "gen-1").status_code == 200
        r = _post(c, 4, "gen-1")
        assert r.status_code == 422 and r.json()["error"] == "request id 'gen-1' was already used for a different request body"
        assert _total(c) == 3


def test_request_ids_survive_a_restart_of_the_server(tmp_path) -> None:
    ledger = str(tmp_path / "ledger.db")
    settings = {"ledger": ledger, "api_keys": ("tok",)}
    with TestClient(create_app(Settings(device="cpu", **settings)), headers=AUTH) as c:
        first = _post(c, 3, "gen-9")
    with TestClient(create_app(Settings(device="cpu", **settings)), headers=AUTH) as c:  # reply cache empty
        again = _post(c, 3, "gen-9")
        assert again.status_code == 200 and again.headers["X-Idempotent-Replay"] == "true"
        losses = [decode_response(r.content, r.headers.get(HEADER_LENGTH))[1]["loss"] for r in (first, again)]
        np.testing.assert_allclose(*losses, rtol=1e-6)
        assert _total(c) == 3
