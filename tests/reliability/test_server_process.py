"""The promises that need a real server process: concurrent quota enforcement, restarts, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from bptvlm.launch import free_port, local_server, wait_ready
from bptvlm.server.ledger import Ledger
from bptvlm.shared.tensors import encode_request

pytestmark = pytest.mark.slow


def _infer_body(pop: int) -> tuple[bytes, dict[str, str]]:
    inputs = {"text_context": np.zeros((pop, 4, 32), np.float32), "images": np.zeros((8, 32, 32, 3), np.uint8),
              "labels": np.zeros(8, np.int64), "class_names": np.array(["a.", "b."], dtype=object)}
    return encode_request(inputs, outputs=["loss"])


@pytest.mark.parametrize("backend, replicas", [("sqlite", 1), ("postgres", 2)], ids=["sqlite-1", "postgres-2"])
def test_sixteen_clients_share_a_quota_exactly(
    backend: str, replicas: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """16 concurrent clients x 10 candidates a request on a 1,000-candidate key, spread over the
    replicas (separate server processes on one ledger): exactly 100 answers and 1,000 charged."""
    target = str(tmp_path / "ledger.db") if backend == "sqlite" else request.getfixturevalue("postgres_database")
    ledger = Ledger(target)
    token = ledger.create_key("team", quota=1000)
    ledger.close()
    auth = {"Authorization": f"Bearer {token}"}
    body, headers = _infer_body(10)
    answered: dict[str, int] = {}
    statuses: list[int] = []
    lock = threading.Lock()

    def client(url: str) -> None:
        with httpx.Client(timeout=60) as http:
            while True:
                r = http.post(f"{url}/v2/models/clip/infer", content=body, headers=headers | auth)
                with lock:
                    statuses.append(r.status_code)
                    answered[url] = answered.get(url, 0) + (r.status_code == 200)
                if r.status_code == 429:
                    assert "Retry-After" not in r.headers and "query budget exhausted" in r.json()["error"]
                    return
                assert r.status_code == 200, r.text

    with ExitStack() as servers:
        urls = [servers.enter_context(local_server("tiny-random", args=["--ledger", target])) for _ in range(replicas)]
        threads = [threading.Thread(target=client, args=(urls[i % replicas],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses.count(200) == 100 and statuses.count(429) == 16  # 100 x 10 candidates = the quota
        assert len(answered) == replicas and min(answered.values()) > 0  # every replica charged some
        assert httpx.get(f"{urls[0]}/v2/usage", headers=auth).json()["usage"]["candidates"] == 1000

    with local_server("tiny-random", args=["--ledger", target]) as url:  # a restart
        report = httpx.get(f"{url}/v2/usage", headers=auth).json()
        # each replica's image cache: the 8 images went through its vision tower once
        assert report == {"usage": {"candidates": 1000, "requests": 100, "image_forwards": 8 * replicas},
                          "remaining": 0}
        r = httpx.post(f"{url}/v2/models/clip/infer", content=body, headers=headers | auth)
        assert r.status_code == 429


def test_sigterm_drains_the_request_in_flight(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "bptvlm.cli", "serve", "--model", "tiny-random", "--port", str(port),
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        # 1000 candidates x 128 images: twice the work that once finished in 0.9 s here, so the signal lands mid-request
        inputs = {"visual_prompt": np.zeros((1000, 4, 32), np.float32), "images": np.zeros((128, 32, 32, 3), np.uint8),
                  "labels": np.zeros(128, np.int64), "class_names": np.array(["a.", "b."], dtype=object)}
        body, headers = encode_request(inputs, outputs=["loss"])
        result: dict[str, object] = {}

        def send() -> None:
            result["r"] = httpx.post(f"{url}/v2/models/clip/infer", content=body, headers=headers, timeout=120)
            result["answered_at"] = time.monotonic()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.8)  # the request is being computed
        signalled_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        sender.join()
        assert result["answered_at"] > signalled_at  # it really was in flight when the signal came
        assert result["r"].status_code == 200  # answered, not cut off
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    finally:
        if proc.poll() is None:
            proc.kill()
