"""Uploaded image batches, kept preprocessed by content hash in a byte-capped LRU."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bptvlm.shared.errors import NotFoundError, PayloadTooLargeError

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
    """Preprocessed batches by (scope, content hash); uploads are idempotent within a scope.

    A scope is one API key: a key sees, and can refer to, only the batches it uploaded itself.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self._lru: ByteLRU[tuple[int, str], ImageBatch] = ByteLRU(
            capacity_bytes, lambda b: b.nbytes, lambda key: len(key[1]) + 64)

    def find(self, images: np.ndarray, scope: int = 0) -> ImageBatch | None:
        """The stored batch of these pixels in ``scope``, if any."""
        return self._lru.get((scope, batch_id(images)))

    def put(self, images: np.ndarray, preprocess: Callable[[np.ndarray], torch.Tensor], scope: int = 0,
            *, must_store: bool = True) -> tuple[ImageBatch, bool]:
        """Store ``images`` (uint8 ``[N, H, W, 3]``); return the batch and whether it was already there.
        A batch over the whole cache is refused (413) when ``must_store``, else returned unstored."""
        key = (scope, batch_id(images))
        found = self._lru.get(key)
        if found is not None:
            return found, True
        batch = ImageBatch(key[1], preprocess(images))
        stored = self._lru.put_if_absent(key, batch)  # concurrent uploads of one batch share one entry
        if stored is None:
            if must_store:
                raise PayloadTooLargeError(
                    f"the batch's {batch.num_images} preprocessed images take {batch.nbytes} bytes, more than the "
                    f"image cache's {self._lru.capacity_bytes}; upload fewer images at a time"
                )
            return batch, False
        return stored, stored is not batch

    def get(self, key: str, scope: int = 0) -> ImageBatch:
        batch = self._lru.get((scope, key))
        if batch is None:
            raise NotFoundError(f"image_batch {key!r} is not stored here (never uploaded by this key, or evicted); "
                                "upload it again")
        return batch

    def holds(self, key: str, scope: int = 0) -> bool:
        """Whether batch ``key`` of ``scope`` is stored (no hit counted)."""
        return (scope, key) in self._lru

    def remember_features(self, batch: ImageBatch, features: torch.Tensor, scope: int = 0) -> None:
        if batch.nbytes + _nbytes(features) > self._lru.capacity_bytes:
            return  # with its features the batch alone would be over the cap, and evicted
        batch.features = features
        self._lru.trim((scope, batch.id))

    @property
    def lru(self) -> ByteLRU[tuple[int, str], ImageBatch]:
        return self._lru
