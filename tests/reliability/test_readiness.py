"""Readiness means a recent forward pass succeeded: an idle server probes itself (charged to nobody),
a failed probe answers 503 with its reason, the next success turns readiness back on."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.server.service import InferenceService

AUTH = {"Authorization": "Bearer tok"}


def _client(ready_probe_s: float) -> TestClient:
    settings = Settings(device="cpu", api_keys=("tok",), ready_probe_s=ready_probe_s)
    return TestClient(create_app(settings), headers=AUTH)


def _charged(c: TestClient) -> int:
    return c.get("/v2/usage").json()["usage"]["candidates"]


def _break_the_vision_tower(monkeypatch: pytest.MonkeyPatch, service: InferenceService) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(service.model, "encode_images", broken)


def _wait_for(c: TestClient, status: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = c.get("/v2/health/ready")
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r.json()
        time.sleep(0.02)


def test_a_failed_probe_turns_readiness_off_with_its_reason_and_a_passing_one_back_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with _client(ready_probe_s=0) as c:  # no loop: the test runs the probe
        service = c.app.state.service
        _break_the_vision_tower(monkeypatch, service)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            service.probe()
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {
            "ready": False,
            "error": "readiness probe failed: RuntimeError: CUDA error: an illegal memory access was encountered",
        }
        monkeypatch.undo()
        service.probe()
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert _charged(c) == 0  # probes are charged to nobody


def test_an_idle_server_probes_itself_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    with _client(ready_probe_s=0.05) as c:
        service = c.app.state.service
        probes: list[float] = []
        real_probe_plan = service._probe_plan

        def counted_probe_plan() -> object:
            probes.append(time.monotonic())
            return real_probe_plan()

        monkeypatch.setattr(service, "_probe_plan", counted_probe_plan)
        _break_the_vision_tower(monkeypatch, service)
        assert "illegal memory access" in _wait_for(c, 503)["error"]  # no request came: the probe found it
        assert probes
        monkeypatch.undo()
        _wait_for(c, 200)  # only a probe ran a forward since
        assert _charged(c) == 0
