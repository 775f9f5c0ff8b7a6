"""Caches never change a result: cached features give the same logits as a fresh computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bptvlm.server.cache import ByteLRU
from bptvlm.server.config import Settings
from bptvlm.server.ledger import KeyRecord
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.service import InferenceService
from bptvlm.shared.protocol import InferenceRequest, RequestedOutput

NAMES = np.array(["dog.", "cat.", "car."], dtype=object)


def _request() -> InferenceRequest:
    return InferenceRequest(inputs=[], outputs=[RequestedOutput(name="logits")])


def _images(seed: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture()
def service(tiny_model: PromptedCLIP) -> InferenceService:
    return InferenceService(tiny_model, Settings(device="cpu"))


def _key(service: InferenceService) -> KeyRecord:
    if not service.ledger.has_keys():
        service.ledger.create_key("k")
    return service.ledger.key("k")


def _logits(service: InferenceService, arrays: dict) -> np.ndarray:
    return service.infer(_request(), arrays, _key(service)).outputs["logits"]


def test_text_only_reuses_image_features(service: InferenceService, tiny_model: PromptedCLIP) -> None:
    ctx = np.random.default_rng(0).normal(0, 0.02, (3, 4, 32)).astype(np.float32)
    arrays = {"text_context": ctx, "images": _images(0), "class_names": NAMES}
    first = service.infer(_request(), arrays, _key(service))
    second = service.infer(_request(), arrays, _key(service))
    assert (first.usage.image_forwards, second.usage.image_forwards) == (4, 0)  # the second hit the cache
    np.testing.assert_array_equal(first.outputs["logits"], second.outputs["logits"])
    pixels = tiny_model.preprocess(_images(0))
    uncached = tiny_model.logits(tiny_model.encode_images(pixels),
                                 tiny_model.encode_text(tiny_model.tokenize(list(NAMES.astype(str))), torch.from_numpy(ctx)))
    np.testing.assert_allclose(second.outputs["logits"], uncached.numpy(), atol=1e-5)


def test_vision_only_reuses_text_features(service: InferenceService) -> None:
    prompt = np.random.default_rng(1).normal(0, 1, (2, 3, 32)).astype(np.float32)
    arrays = {"visual_prompt": prompt, "images": _images(1), "class_names": NAMES}
    a = _logits(service, arrays)
    hits = service.text_features.hits
    b = _logits(service, arrays)
    assert service.text_features.hits == hits + 1
    np.testing.assert_array_equal(a, b)
    fresh = InferenceService(service.model, Settings(device="cpu"))
    np.testing.assert_allclose(_logits(fresh, arrays), b, atol=1e-6)


def test_image_store_evicts_least_recently_used(tiny_model: PromptedCLIP) -> None:
    one_batch = 4 * 3 * 32 * 32 * 4  # float32 pixels of 4 images
    service = InferenceService(tiny_model, Settings(device="cpu", image_cache_bytes=2 * one_batch + 512))  # + keys
    ids = [service.upload({"images": _images(s)}).image_batch for s in range(3)]
    assert not service.images.holds(ids[0]) and service.images.holds(ids[1]) and service.images.holds(ids[2])
    assert service.upload({"images": _images(1)}).cached


def test_byte_lru_counts_and_caps() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    lru.put("a", b"12345")
    lru.put("b", b"12345")
    assert lru.get("a") == b"12345"  # a is now the most recent
    lru.put("c", b"1")
    assert "b" not in lru and "a" in lru and lru.nbytes == 6
    assert lru.get("zz") is None and (lru.hits, lru.misses) == (1, 1)


def test_concurrent_uploads_of_one_batch_share_one_entry(service: InferenceService) -> None:
    import threading

    results = []
    barrier = threading.Barrier(4)

    def slow_preprocess(images: np.ndarray) -> torch.Tensor:
        barrier.wait(timeout=10)  # all four miss the cache before any stores
        return service._preprocess(images)

    threads = [threading.Thread(target=lambda: results.append(service.images.put(_images(7), slow_preprocess)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(batch) for batch, _ in results}) == 1
    assert sorted(cached for _, cached in results) == [False, True, True, True]
