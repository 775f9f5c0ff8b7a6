"""End to end: the server as a real uvicorn subprocess, the client as another process, HTTP between."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bptvlm.client.api import ClipClient
from bptvlm.client.artifacts import load_prompts
from bptvlm.client.data import FewShotData
from bptvlm.client.config import TuneConfig
from bptvlm.client.evaluate import evaluate_saved
from bptvlm.client.run import run_tuning
from bptvlm.launch import local_server
from bptvlm.shared.tensors import HEADER_LENGTH, decode_response, encode_request

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220)}


def _image_folder(root: Path, per_class: int = 12) -> Path:
    """Three classes of noisy solid-colour images, split into train/ and test/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with local_server("tiny-random", args=["--api-key", "e2e-key"]) as url:
        yield url


def test_tuning_run_across_processes(server: str, tmp_path: Path) -> None:
    data, out, budget = _image_folder(tmp_path / "data"), tmp_path / "run", 200
    cmd = [sys.executable, "-m", "bptvlm.cli", "tune", "--endpoint", server, "--api-key", "e2e-key",
           "--data", str(data), "--shots", "8", "--optimizer", "CMA", "--popsize", "12", "--budget", str(budget),
           "--seed", "0", "--intrinsic-dim-text", "40", "--intrinsic-dim-vision", "40", "--out", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_queries"] == budget  # the last generation was truncated, never exceeded
    assert summary["best_train_loss"] < summary["initial_train_loss"]
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["queries"] == budget and len(progress) == -(-budget // 12)
    assert (out / "prompts.safetensors").stat().st_size > 0

    # The server charged exactly what the client counted: training plus evaluation queries.
    usage = httpx.get(f"{server}/v2/usage", headers={"Authorization": "Bearer e2e-key"}).json()["usage"]
    assert usage["candidates"] == summary["train_queries"] + summary["eval_queries"]


@pytest.mark.parametrize("text_context", ["per_class", "mixed"])
def test_class_text_contexts_tune_and_are_bound_to_their_classes(server: str, tmp_path: Path, text_context: str) -> None:
    rng = np.random.default_rng(0)
    images = np.stack([np.full((24, 24, 3), rgb, np.uint8) for rgb in COLOURS.values()] * 4)
    images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    labels = np.tile(np.arange(3), 4)
    data = FewShotData(list(COLOURS), images, labels, images[:6], labels[:6])  # no validation split: never the template
    config = TuneConfig(optimizer="CMA", popsize=8, budget=48, d_text=20, variant="text", text_context=text_context)
    with ClipClient(server, api_key="e2e-key") as client:
        summary = run_tuning(client, data, config, tmp_path, progress=False)
        assert summary["train_queries"] == 48 and summary["text_context"] == text_context
        assert summary["best_train_loss"] < summary["initial_train_loss"]
        saved = load_prompts(tmp_path / "prompts.safetensors")
        assert saved.tensors["text_context"].shape[:3] == (1, 3, summary["n_ctx_text"])
        assert saved.meta["class_contexts"] == 3
        assert evaluate_saved(client, tmp_path / "prompts.safetensors", data)["num_test"] == 6
        renamed = FewShotData(["a", "b", "c"], images, labels, images[:6], labels[:6])
        with pytest.raises(ValueError, match="one text context per class"):
            evaluate_saved(client, tmp_path / "prompts.safetensors", renamed)


def test_only_loss_and_logits_leave_the_server(server: str) -> None:
    inputs = {"text_context": np.zeros((2, 4, 32), np.float32), "visual_prompt": np.zeros((2, 1, 32), np.float32),
              "images": np.zeros((3, 32, 32, 3), np.uint8), "labels": np.array([0, 1, 0]),
              "class_names": np.array(["red.", "blue."], dtype=object)}
    for binary in (True, False):
        body, headers = encode_request(inputs, outputs=["loss", "logits"], binary=binary)
        r = httpx.post(f"{server}/v2/models/clip/infer", content=body,
                       headers=headers | {"Authorization": "Bearer e2e-key"})
        assert r.status_code == 200, r.text
        response, arrays = decode_response(r.content, r.headers.get(HEADER_LENGTH))
        assert set(arrays) == {"loss", "logits"}
        assert set(response.parameters or {}) == {"usage", "usage_total"}
        assert set(response.model_dump(exclude_none=True)) == {"model_name", "model_version", "parameters", "outputs"}


def test_wrong_key_is_refused_by_the_real_server(server: str) -> None:
    r = httpx.get(f"{server}/v2/models/clip", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"error": "unknown API key"}
