"""Uploaded image batches, kept preprocessed by content hash in a byte-capped LRU."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bptvlm.shared.errors import NotFoundError

from .cache import ByteLRU


def batch_id(images: np.ndarray) -> str:
    """Content hash of a uint8 ``[N, H, W, 3]`` batch; equal pixels give equal ids."""
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return "sha256:" + digest.hexdigest()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class ImageBatch:
    """One stored batch. ``features`` caches the unprompted image features ``[1, N, E]``: they
    cannot change without a visual prompt, so text-only tuning runs the vision tower once."""

    id: str
    pixel_values: torch.Tensor  # [N, 3, S, S]
    features: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.pixel_values) + _nbytes(self.features)


class ImageStore:
    """Preprocessed batches by content hash; uploads are idempotent."""

    def __init__(self, capacity_bytes: int) -> None:
        self._lru: ByteLRU[str, ImageBatch] = ByteLRU(capacity_bytes, lambda b: b.nbytes)

    def put(self, images: np.ndarray, preprocess: Callable[[np.ndarray], torch.Tensor]) -> tuple[ImageBatch, bool]:
        """Store ``images`` (uint8 ``[N, H, W, 3]``); return the batch and whether it was already there."""
        key = batch_id(images)
        found = self._lru.get(key)
        if found is not None:
            return found, True
        batch = ImageBatch(key, preprocess(images))
        stored = self._lru.put_if_absent(key, batch)  # concurrent uploads of one batch share one entry
        return stored, stored is not batch

    def get(self, key: str) -> ImageBatch:
        batch = self._lru.get(key)
        if batch is None:
            raise NotFoundError(f"image_batch {key!r} is not stored here (never uploaded, or evicted); upload it again")
        return batch

    def remember_features(self, batch: ImageBatch, features: torch.Tensor) -> None:
        batch.features = features
        self._lru.trim()

    @property
    def lru(self) -> ByteLRU[str, ImageBatch]:
        return self._lru
