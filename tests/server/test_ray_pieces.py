"""The Ray engine's pieces that need no Ray: the proxy's error rewriting, the image depot, the install hint."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from bptvlm.server.ray_proxy import DIED, ProxyErrors
from bptvlm.server.ray_images import ImageDepot


async def _plain_500(request: Request) -> Response:
    return PlainTextResponse("Internal Server Error", status_code=500)


async def _nothing(scope, receive, send) -> None:  # what Ray's proxy does when the replica died
    return None


async def _not_found(request: Request) -> Response:
    return PlainTextResponse("Path '/x' not found. Ping http://.../-/routes for available routes.", status_code=404)


async def _ours(request: Request) -> Response:  # an error our app made: it names the replica
    return JSONResponse({"error": "invalid tensor"}, status_code=422, headers={"X-Bptvlm-Replica": "r1"})


def _client() -> TestClient:
    app = Starlette(routes=[Route("/500", _plain_500), Route("/404", _not_found), Route("/422", _ours)])

    async def router(scope, receive, send) -> None:
        await (_nothing if scope.get("path") == "/silent" else app)(scope, receive, send)

    return TestClient(ProxyErrors(router), raise_server_exceptions=False)


@pytest.mark.parametrize("path", ["/500", "/silent"], ids=["plain-500", "no-response"])
def test_a_dead_replica_becomes_a_retryable_503(path: str) -> None:
    r = _client().get(path)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"].startswith(DIED)


def test_proxy_errors_get_the_contract_shape_and_keep_their_status() -> None:
    r = _client().get("/404")
    assert r.status_code == 404 and "not found" in r.json()["error"] and "retry-after" not in r.headers


def test_errors_from_a_replica_pass_untouched() -> None:
    r = _client().get("/422")
    assert r.status_code == 422 and r.json() == {"error": "invalid tensor"}


def test_depot_keeps_batches_by_scope_and_drops_the_oldest_past_its_cap() -> None:
    a, b = (np.full((2, 4, 4, 3), v, np.uint8) for v in (1, 2))  # 96 bytes each
    depot = ImageDepot(capacity_bytes=200)
    depot.put(1, "a", a)
    assert depot.get(2, "a") is None  # another key's scope
    depot.put(1, "b", b)
    depot.get(1, "a")  # a is now the most recent
    depot.put(1, "c", b)
    assert depot.get(1, "b") is None and np.array_equal(depot.get(1, "a"), a)
    depot.put(1, "big", np.zeros((5, 4, 4, 3), np.uint8))  # 240 bytes, over the cap alone: not kept
    assert depot.get(1, "big") is None


def test_engine_ray_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bptvlm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "--engine", "ray", "--replicas", "2"]) == 2
    assert "pip install 'bptvlm[ray]'" in capsys.readouterr().err


def test_engine_ray_refuses_zero_replicas(capsys) -> None:
    pytest.importorskip("ray.serve")
    from bptvlm.cli import main

    assert main(["serve", "--engine", "ray", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_ray_s_health_check_is_our_readiness() -> None:
    from bptvlm.server.health import Readiness
    from bptvlm.server.ledger import Ledger
    from bptvlm.server.ray_engine import BptvlmReplica

    replica = BptvlmReplica.__new__(BptvlmReplica)  # no Ray: only the check
    replica.replica, replica.service = "r1", type("S", (), {"readiness": Readiness(), "ledger": Ledger()})()
    replica.check_health()  # ready: returns
    replica.service.readiness.failed("out of memory even one image at a time")
    with pytest.raises(RuntimeError, match="r1 not ready: out of memory"):
        replica.check_health()
