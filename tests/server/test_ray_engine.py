"""``bptvlm serve --engine ray``: two Ray Serve replicas of tiny-random behind Ray's proxy, on loopback.

One local Ray (2 CPUs, no dashboard) and one deployment are shared by the module's tests (starting them
takes most of the module's time). The ledger is one SQLite file the replicas share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'bptvlm[ray]'")

from bptvlm.client.api import ClipClient
from bptvlm.launch import free_port
from bptvlm.server import ray_engine
from bptvlm.server.config import Settings
from bptvlm.server.ledger import Ledger
from bptvlm.shared.errors import BudgetExhaustedError

W = 32  # text and vision width of the tiny model
NAMES = np.array([b"dog.", b"cat.", b"car."], dtype=object)
LABELS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
IMAGES = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
pytestmark = pytest.mark.slow


@dataclass
class RayServer:
    url: str
    ledger: Path
    tokens: dict[str, str]

    def client(self, key: str, **kw: object) -> ClipClient:
        return ClipClient(self.url, api_key=self.tokens[key], **kw)  # type: ignore[arg-type]

    def charged(self, key: str) -> int:
        ledger = Ledger(self.ledger)
        try:
            return ledger.usage(ledger.key(key)).candidates
        finally:
            ledger.close()


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    path = tmp_path_factory.mktemp("ray") / "ledger.db"
    ledger = Ledger(path)
    tokens = {name: ledger.create_key(name, quota=quota) for name, quota in
              (("thousand", 1000), ("open", None), ("crash", None))}
    ledger.close()
    settings = Settings(model="tiny-random", device="cpu", ledger=str(path), ledger_lease_s=3.0, ready_probe_s=0)
    options = ray_engine.RayOptions(replicas=2, num_cpus=2, cpus_per_replica=0.5, health_check_period_s=1.0)
    port = free_port()
    ray_engine.start(settings, options, "127.0.0.1", port)
    try:
        yield RayServer(f"http://127.0.0.1:{port}", path, tokens)
    finally:
        ray_engine.stop()


def _prompts(pop: int, seed: int = 0) -> dict[str, np.ndarray]:
    ctx = np.random.default_rng(seed).normal(0, 0.02, (pop, 4, W)).astype(np.float32)
    return {"text_context": ctx, "labels": LABELS, "class_names": NAMES}


def _infer(client: ClipClient, batch: str, pop: int, seed: int = 0) -> np.ndarray:
    result = client.infer({**_prompts(pop, seed), "image_batch": np.array([batch.encode()], dtype=object)},
                          outputs=("loss",))
    assert result.loss is not None and result.usage.candidates == pop
    return result.loss


def test_both_replicas_answer(ray_server: RayServer) -> None:
    import httpx

    seen = set()
    for _ in range(60):
        response = httpx.get(f"{ray_server.url}/v2/health/ready", timeout=10)
        assert response.status_code == 200, response.text
        seen.add(response.headers[ray_engine.REPLICA_HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"only replica(s) {seen} answered 60 requests"


def test_upload_on_one_replica_serves_inference_on_every_replica(ray_server: RayServer) -> None:
    with ray_server.client("open") as client:
        batch = client.upload_images(IMAGES)
        first = _infer(client, batch, 3)
        for _ in range(6):  # Ray routes these to both replicas; each answers from the depot or its own store
            np.testing.assert_allclose(_infer(client, batch, 3), first, rtol=1e-6)


def test_sixteen_clients_charge_exactly_the_quota(ray_server: RayServer) -> None:
    with ray_server.client("thousand") as uploader:
        batch = uploader.upload_images(IMAGES)

    def spend(i: int) -> int:
        spent = 0
        with ray_server.client("thousand", max_retries=20) as client:
            while True:
                try:
                    _infer(client, batch, 8, seed=i)
                except BudgetExhaustedError:
                    return spent
                spent += 8

    with ThreadPoolExecutor(16) as pool:
        answered = sum(pool.map(spend, range(16)))
    assert answered == 1000
    assert ray_server.charged("thousand") == 1000
    with ray_server.client("thousand") as client:
        report = client.usage_report()
    assert report is not None and report.remaining == 0


def test_tritonclient_round_trip_through_the_proxy(ray_server: RayServer) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    triton = httpclient.InferenceServerClient(url=ray_server.url.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {ray_server.tokens['open']}"}
    assert triton.is_server_ready()
    assert triton.get_model_metadata("clip", headers=auth)["name"] == "clip"
    inputs = []
    for name, array, dtype in (("text_context", np.zeros((2, 4, W), np.float32), "FP32"),
                               ("images", IMAGES, "UINT8"), ("labels", LABELS, "INT64"),
                               ("class_names", NAMES, "BYTES")):
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    result = triton.infer("clip", inputs, outputs=[httpclient.InferRequestedOutput("loss", binary_data=True)],
                          headers=auth)
    loss = result.as_numpy("loss")
    assert loss.shape == (2,) and np.isfinite(loss).all()
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)  # two equal candidates


def _replica_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and "bptvlm" in a["name"]]


def test_killed_replica_loses_no_request_and_no_charge(ray_server: RayServer) -> None:
    import ray

    with ray_server.client("crash") as uploader:
        batch = uploader.upload_images(IMAGES)
    before = ray_server.charged("crash")
    go, sent = threading.Event(), []

    def work(i: int) -> int:
        with ray_server.client("crash", max_retries=None, retry_for=60.0, backoff=0.2) as client:
            for j in range(12):
                if j == 3:
                    go.set()
                _infer(client, batch, 5, seed=i)
        return 12 * 5

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(work, i) for i in range(6)]
        assert go.wait(60)
        victim = _replica_actors()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        sent = [f.result(timeout=120) for f in futures]
    assert ray_server.charged("crash") - before == sum(sent)
    deadline = time.monotonic() + 60  # Ray starts a replacement replica
    while time.monotonic() < deadline and (len(_replica_actors()) < 2 or victim in _replica_actors()):
        time.sleep(0.5)
    assert len(_replica_actors()) == 2 and victim not in _replica_actors()
