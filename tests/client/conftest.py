"""Client fixtures: a fake V2 server behind ``httpx.MockTransport`` and ImageFolder trees on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bptvlm.client.api import ClipClient
from bptvlm.shared import protocol as p
from bptvlm.shared.tensors import HEADER_LENGTH, decode_request, encode_response

LIMITS = p.PromptLimits(
    text_width=6,
    vision_width=5,
    max_text_context=8,
    max_visual_prompt=8,
    context_length=16,
    image_size=8,
    patch_size=4,
    num_channels=3,
    projection_dim=4,
    token_embedding_std=0.02,
    patch_embedding_mean=0.001,
    patch_embedding_std=0.03,
    patch_token_std=1.0,
)


class FakeServer:
    """Speaks enough V2 for the client: the loss of a candidate is its squared distance to a fixed
    target prompt (so an optimizer can lower it); logits are right for prompted requests and wrong
    for unprompted (zero-shot) ones. Records every request; ``script`` prepends canned responses."""

    def __init__(self, limits: p.PromptLimits = LIMITS, seed: int = 0) -> None:
        self.limits = limits
        rng = np.random.default_rng(seed)
        self.target_text = rng.normal(0, 0.05, (1, 1, limits.text_width)).astype(np.float32)
        self.target_vision = rng.normal(0, 0.05, (1, 1, limits.vision_width)).astype(np.float32)
        self.requests: list[httpx.Request] = []
        self.infer_bodies: list[tuple[p.InferenceRequest, dict[str, np.ndarray]]] = []
        self.batches: dict[str, int] = {}
        self.script: list[httpx.Response] = []
        self.template_wins_on: set[str] = set()  # image batches where unprompted logits are right, prompted wrong
        self.candidates = 0

    def metadata(self) -> dict[str, Any]:
        return p.ModelMetadata(
            name="clip", versions=["1"], platform="fake", inputs=[], outputs=[],
            parameters={"protocol_version": p.PROTOCOL_VERSION, "model_id": "fake-clip", "prompt": self.limits.model_dump()},
        ).model_dump()  # fmt: skip

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            return self.script.pop(0)
        path = request.url.path
        if path.startswith("/v2/health/"):
            return httpx.Response(200, json={"ok": True})
        if path == "/v2":
            return httpx.Response(200, json={"name": "fake", "version": "0", "extensions": []})
        if path == "/v2/models/clip":
            return httpx.Response(200, json=self.metadata())
        if path == "/v2/models/clip/images":
            _, arrays = decode_request(request.content, request.headers.get(HEADER_LENGTH))
            images = arrays[p.IMAGES]
            batch_id = "sha256:" + hashlib.sha256(images.tobytes()).hexdigest()[:16]
            cached = batch_id in self.batches
            self.batches[batch_id] = len(images)
            return httpx.Response(200, json={"image_batch": batch_id, "num_images": len(images), "cached": cached})
        if path == "/v2/models/clip/tokenize":  # one token per word
            texts = json.loads(request.content)["texts"]
            return httpx.Response(200, json={"num_tokens": [len(t.split()) for t in texts]})
        if path == "/v2/models/clip/infer":
            return self._infer(request)
        return httpx.Response(404, json={"error": f"no route {path}"})

    def _infer(self, request: httpx.Request) -> httpx.Response:
        req, arrays = decode_request(request.content, request.headers.get(HEADER_LENGTH))
        self.infer_bodies.append((req, arrays))
        batch_id = arrays[p.IMAGE_BATCH][0].decode()
        if batch_id not in self.batches:
            return httpx.Response(404, json={"error": f"unknown image_batch {batch_id!r}"})
        labels = arrays[p.LABELS]
        n, c = len(labels), len(arrays[p.CLASS_NAMES])
        prompts = [a for a in (arrays.get(p.TEXT_CONTEXT), arrays.get(p.VISUAL_PROMPT)) if a is not None]
        pop = prompts[0].shape[0] if prompts else 1
        loss = np.full(pop, 1.0, np.float32)
        if p.TEXT_CONTEXT in arrays:
            loss += ((arrays[p.TEXT_CONTEXT] - self.target_text) ** 2).reshape(pop, -1).mean(axis=1) * 100
        if p.VISUAL_PROMPT in arrays:
            loss += ((arrays[p.VISUAL_PROMPT] - self.target_vision) ** 2).reshape(pop, -1).mean(axis=1) * 100
        right = (not prompts) == (batch_id in self.template_wins_on)
        shown = labels if right else (labels + 1) % c
        logits = np.broadcast_to(np.eye(c, dtype=np.float32)[shown], (pop, n, c)).copy()
        wanted = [o.name for o in req.outputs or []]
        outs = {name: {"loss": loss, "logits": logits}[name] for name in wanted}
        self.candidates += pop
        usage = p.Usage(candidates=pop, requests=1, image_forwards=n * pop)
        response = p.InferenceResponse(model_name="clip", id=req.id, parameters={"usage": usage.model_dump()}, outputs=[])
        body, headers = encode_response(response, outs, {name: True for name in wanted})
        return httpx.Response(200, content=body, headers=headers)


@pytest.fixture()
def fake_server() -> FakeServer:
    return FakeServer()


@pytest.fixture()
def sleeps() -> list[float]:
    return []


@pytest.fixture()
def make_client(fake_server: FakeServer, sleeps: list[float]) -> Callable[..., ClipClient]:
    def make(**kwargs: Any) -> ClipClient:
        kwargs.setdefault("transport", httpx.MockTransport(fake_server))
        return ClipClient("http://fake", sleep=sleeps.append, **kwargs)

    return make


@pytest.fixture()
def client(make_client: Callable[..., ClipClient]) -> ClipClient:
    return make_client()


def write_image_folder(root: Path, counts: dict[str, int], size: int = 12, seed: int = 0, tint: bool = False) -> Path:
    """``root/<class>/<i>.png`` with ``counts[class]`` random RGB images each; with ``tint`` the k-th
    class saturates colour channel k % 3 (a signal a prompt can learn)."""
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)  # not square on purpose
            if tint:
                pixels[..., k % 3] = 255
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture()
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(counts: dict[str, int], *, split: bool = False, test_counts: dict[str, int] | None = None) -> Path:
        root = tmp_path / "data"
        if split:
            write_image_folder(root / "train", counts)
            write_image_folder(root / "test", test_counts or counts, seed=1)
        else:
            write_image_folder(root, counts)
        return root

    return make


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
