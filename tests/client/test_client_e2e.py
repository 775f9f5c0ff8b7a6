"""End to end: the server as a real uvicorn process on 127.0.0.1, ``bptvlm tune`` as another process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bptvlm.client.api import ClipClient
from bptvlm.shared import protocol as p

from .conftest import write_image_folder

pytestmark = pytest.mark.slow
KEY = "e2e-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bptvlm.cli", "serve", "--model", "tiny-random", "--port", str(port),
         "--api-key", KEY, "--quota", "10000", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        with ClipClient(url, api_key=KEY) as client:
            client.wait_until_ready(timeout=90)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tune_as_a_separate_process_charges_exactly(endpoint: str, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", {"red": 8, "green": 8, "blue": 8}, size=32, tint=True)
    out = tmp_path / "run"
    env = {**os.environ, "BPTVLM_API_KEY": KEY}
    subprocess.run(
        [sys.executable, "-m", "bptvlm.cli", "tune", "--endpoint", endpoint, "--data", str(data), "--shots", "4",
         "--budget", "150", "--popsize", "15", "--intrinsic-dim-text", "30", "--intrinsic-dim-vision", "30",
         "--seed", "0", "--out", str(out), "--no-progress"],
        env=env, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_queries"] == 150 and summary["generations"] == 10
    assert summary["best_train_loss"] < summary["initial_train_loss"]
    assert len((out / "progress.jsonl").read_text().splitlines()) == 10

    # The server's own ledger agrees: everything charged to the key is the run's queries plus this one.
    with ClipClient(endpoint, api_key=KEY) as client:
        batch = client.upload_images(np.zeros((1, 8, 8, 3), np.uint8))
        result = client.infer(
            {p.IMAGE_BATCH: np.array([batch.encode()], dtype=object), p.CLASS_NAMES: np.array([b"a."], dtype=object)},
            outputs=(p.LOGITS,),
        )
    total = result.parameters["usage_total"]["candidates"]
    assert total == summary["train_queries"] + summary["eval_queries"] + 1


def test_paper_preset_at_the_papers_caltech_budget(endpoint: str, tmp_path: Path) -> None:
    """`--preset paper` (CMA-ES, popsize 30, 500 + 500 dims, joint) to 3,600 queries: it used to die at
    1,800 with pycma's 'Mean shift samples are expected but missing'."""
    data = write_image_folder(tmp_path / "data", {"red": 6, "green": 6, "blue": 6}, size=32, tint=True)
    out = tmp_path / "paper"
    env = {**os.environ, "BPTVLM_API_KEY": KEY}
    subprocess.run(
        [sys.executable, "-m", "bptvlm.cli", "tune", "--preset", "paper", "--endpoint", endpoint, "--data", str(data),
         "--shots", "2", "--val-shots", "1", "--budget", "3600", "--out", str(out), "--no-progress"],
        env=env, check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_queries"] == 3600 and summary["generations"] == 120
    assert summary["config"]["optimizer"] == "CMA" and summary["strategy"] == "CMA -> ParametrizedCMA(popsize=30)"
    assert (summary["d_text"], summary["d_vision"], summary["popsize"], summary["variant"]) == (500, 500, 30, "joint")


def test_readme_python_api_example_runs(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's notebook example, executed as written but for the endpoint and key."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = readme.split("<!-- python-api-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"http://127.0.0.1:8000"', repr(endpoint))
    monkeypatch.setenv("BPTVLM_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert result.summary["train_queries"] == 300  # type: ignore[attr-defined]
    assert len(result.history) == 10  # type: ignore[attr-defined]
