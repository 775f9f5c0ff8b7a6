"""ClipClient against a mock transport: decoding, caching, error mapping and the retry policy."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest

from bptvlm.client.api import REQUEST_ID_HEADER, ClipClient, parse_retry_after
from bptvlm.shared import errors as e
from bptvlm.shared import protocol as p

from .conftest import LIMITS, FakeServer

IMAGES = np.zeros((4, 8, 8, 3), np.uint8)


def _error(status: int, message: str = "nope", retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": message}, headers=headers)


def test_metadata_and_limits(client: ClipClient) -> None:
    assert client.ready() and client.live()
    assert client.model_metadata().name == "clip"
    assert client.prompt_limits() == LIMITS
    assert client.server_metadata()["name"] == "fake"


def test_protocol_version_mismatch_is_refused(client: ClipClient, fake_server: FakeServer) -> None:
    meta = fake_server.metadata()
    meta["parameters"]["protocol_version"] = "999"
    fake_server.script.append(httpx.Response(200, json=meta))
    with pytest.raises(e.ProtocolError, match="protocol 999"):
        client.model_metadata()


def test_upload_is_cached_by_content(client: ClipClient, fake_server: FakeServer) -> None:
    first = client.upload_images(IMAGES)
    assert client.upload_images(IMAGES.copy()) == first
    other = client.upload_images(IMAGES + 1)
    assert other != first
    uploads = [r for r in fake_server.requests if r.url.path.endswith("/images")]
    assert len(uploads) == 2
    client.upload_images(IMAGES, force=True)
    assert len([r for r in fake_server.requests if r.url.path.endswith("/images")]) == 3


def test_upload_rejects_wrong_images_before_sending(client: ClipClient, fake_server: FakeServer) -> None:
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\].*float32 \[4, 8, 8, 3\]"):
        client.upload_images(IMAGES.astype(np.float32))
    assert not fake_server.requests


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_decodes_loss_logits_and_usage(make_client: Callable[..., ClipClient], binary: bool) -> None:
    client = make_client(binary=binary)
    batch = client.upload_images(IMAGES)
    inputs = {
        p.TEXT_CONTEXT: np.zeros((3, 2, LIMITS.text_width), np.float32),
        p.IMAGE_BATCH: np.array([batch.encode()], dtype=object),
        p.LABELS: np.array([0, 1, 0, 1], np.int64),
        p.CLASS_NAMES: np.array([b"cat.", b"dog."], dtype=object),
    }
    result = client.infer(inputs, outputs=(p.LOSS, p.LOGITS), request_id="gen-0")
    assert result.loss is not None and result.loss.shape == (3,) and result.loss.dtype == np.float32
    assert result.logits is not None and result.logits.shape == (3, 4, 2)
    assert result.usage == p.Usage(candidates=3, requests=1, image_forwards=12)
    assert result.request_id == "gen-0"
    client.infer(inputs)
    assert client.usage.candidates == 6 and client.usage.requests == 2


def test_auth_header_and_request_id(make_client: Callable[..., ClipClient], fake_server: FakeServer) -> None:
    make_client(api_key="k-123").model_metadata()
    make_client().model_metadata()
    with_key, without = fake_server.requests
    assert with_key.headers["Authorization"] == "Bearer k-123"
    assert "Authorization" not in without.headers
    assert len(with_key.headers[REQUEST_ID_HEADER]) == 32


@pytest.mark.parametrize(
    ("status", "retry_after", "cls"),
    [
        (400, None, e.ProtocolError),
        (401, None, e.AuthError),
        (404, None, e.NotFoundError),
        (413, None, e.PayloadTooLargeError),
        (422, None, e.InvalidTensorError),
        (429, None, e.BudgetExhaustedError),
        (500, None, e.BptvlmError),
    ],
    ids=["400", "401", "404", "413", "422", "429-budget", "500"],
)
def test_errors_are_mapped_and_never_retried(
    client: ClipClient, fake_server: FakeServer, sleeps: list[float], status: int, retry_after: str | None, cls: type
) -> None:
    fake_server.script.append(_error(status, f"message {status}", retry_after))
    with pytest.raises(cls, match=f"message {status}") as info:
        client.model_metadata()
    assert info.value.status_code == status
    assert len(fake_server.requests) == 1 and sleeps == []


def test_non_json_error_body_keeps_its_text(client: ClipClient, fake_server: FakeServer) -> None:
    fake_server.script.append(httpx.Response(502, text="bad gateway from proxy"))
    with pytest.raises(e.BptvlmError, match="bad gateway from proxy"):
        client.model_metadata()


def test_503_is_retried_with_the_same_request_id(client: ClipClient, fake_server: FakeServer, sleeps: list[float]) -> None:
    fake_server.script += [_error(503, "loading"), _error(503, "loading", retry_after="7")]
    batch = client.upload_images(IMAGES)
    assert batch.startswith("sha256:")
    ids = {r.headers[REQUEST_ID_HEADER] for r in fake_server.requests}
    assert len(fake_server.requests) == 3 and len(ids) == 1
    assert sleeps == [0.5, 7.0]  # exponential backoff, then the server's Retry-After


def test_429_with_retry_after_is_honoured(client: ClipClient, fake_server: FakeServer, sleeps: list[float]) -> None:
    fake_server.script += [_error(429, "slow down", retry_after="3"), _error(429, "slow down", retry_after="2")]
    client.model_metadata()
    assert sleeps == [3.0, 2.0]


def test_retries_give_up_after_max_retries(make_client: Callable[..., ClipClient], fake_server: FakeServer, sleeps: list[float]) -> None:
    client = make_client(max_retries=2)
    fake_server.script += [_error(503, "busy")] * 5
    with pytest.raises(e.NotReadyError, match="busy"):
        client.model_metadata()
    assert len(fake_server.requests) == 3 and sleeps == [0.5, 1.0]


def test_connection_errors_are_retried(sleeps: list[float]) -> None:
    calls: list[httpx.Request] = []
    server = FakeServer()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused", request=request)
        return server(request)

    client = ClipClient("http://fake", transport=httpx.MockTransport(flaky), sleep=sleeps.append)
    assert client.model_metadata().name == "clip"
    assert len(calls) == 3 and sleeps == [0.5, 1.0]
    assert len({r.headers[REQUEST_ID_HEADER] for r in calls}) == 1


def test_read_timeouts_are_not_retried(sleeps: list[float]) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("too slow", request=request)

    client = ClipClient("http://fake", transport=httpx.MockTransport(slow), sleep=sleeps.append)
    with pytest.raises(httpx.ReadTimeout):
        client.model_metadata()
    assert sleeps == []


def test_backoff_is_capped(make_client: Callable[..., ClipClient], fake_server: FakeServer, sleeps: list[float]) -> None:
    client = make_client(max_retries=8, backoff=1.0, max_backoff=4.0)
    fake_server.script += [_error(503, "busy")] * 6
    client.model_metadata()
    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_not_ready_server(client: ClipClient, fake_server: FakeServer) -> None:
    fake_server.script += [_error(503, "loading")] * 100
    assert not client.ready()
    with pytest.raises(e.NotReadyError):
        client.wait_until_ready(timeout=0.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("5", 5.0), ("0.25", 0.25), ("-3", 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None)],
    ids=["absent", "seconds", "fraction", "negative", "past-date", "garbage"],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected
