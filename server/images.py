"""Uploaded image batches, kept preprocessed by content hash in a byte-capped LRU."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bptvlm.shared.errors import NotFoundError


def batch_id(images: np.ndarray) -> str:
    """Content hash of a uint8 ``[N, H, W, 3]`` batch; equal pixels give equal ids."""
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class ImageBatch:
    """One stored batch. ``features`` caches the unprompted image features ``[1, N, E]``."""

    id: str
    pixel_values: torch.Tensor  # [N, 3, S, S]
    features: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def nbytes(self) -> int:
        extra = 0 if self.features is None else self.features.numel() * self.features.element_size()
        return self.pixel_values.numel() * self.pixel_values.element_size() + extra


class ImageStore:
    """Thread-safe LRU of preprocessed batches, evicting the least recently used past ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, ImageBatch] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, images: np.ndarray, preprocess: Callable[[np.ndarray], torch.Tensor]) -> tuple[ImageBatch, bool]:
        """Store ``images`` (uint8 ``[N, H, W, 3]``); return the batch and whether it was already there."""
        key = batch_id(images)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
        batch = ImageBatch(key, preprocess(images))
        with self._lock:
            self._items[key] = batch
            self._evict()
        return batch, False

    def get(self, key: str) -> ImageBatch:
        with self._lock:
            if key not in self._items:
                raise NotFoundError(
                    f"image_batch {key!r} is not stored here (never uploaded, or evicted); upload it again"
                )
            self._items.move_to_end(key)
            return self._items[key]

    def remember_features(self, batch: ImageBatch, features: torch.Tensor) -> None:
        with self._lock:
            batch.features = features
            self._evict()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        # Keep the newest batch even if it alone is over the cap: it is about to be used.
        while len(self._items) > 1 and self.nbytes > self.capacity_bytes:
            self._items.popitem(last=False)
