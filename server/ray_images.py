"""Uploaded images shared by the Ray Serve replicas of one deployment.

Ray's proxy routes each request to any replica, so an upload answered by one replica is followed by
inference on another. Each replica keeps its own preprocessed LRU (``images.ImageStore``); an upload
also puts the raw pixels into one named Ray actor (``ImageDepot``, byte-capped LRU, in Ray's object
store so it works across hosts), and a replica that misses a batch fetches it from there and
preprocesses it once. The depot is only consulted on a local miss: the hot path stays local.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .images import ImageBatch, ImageStore

log = logging.getLogger(__name__)

DEPOT_NAME = "bptvlm-image-depot"


class ImageDepot:
    """Raw uint8 batches ``[N, H, W, 3]`` by (scope, id), least recently used dropped past ``capacity_bytes``.
    Run as a Ray actor (``depot_handle``); plain methods so it is testable without Ray."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._bytes = 0

    def put(self, scope: int, key: str, images: np.ndarray) -> None:
        slot = (scope, key)
        if slot in self._items or images.nbytes > self.capacity_bytes:
            return
        self._items[slot] = images
        self._bytes += images.nbytes
        while self._bytes > self.capacity_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def get(self, scope: int, key: str) -> np.ndarray | None:
        found = self._items.get((scope, key))
        if found is not None:
            self._items.move_to_end((scope, key))
        return found


def depot_handle(capacity_bytes: int, namespace: str) -> Any:
    """The deployment's one depot actor (created by whichever replica asks first)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(ImageDepot)
    return actor.options(name=DEPOT_NAME, namespace=namespace, get_if_exists=True, lifetime="detached").remote(
        capacity_bytes)


class SharedImageStore(ImageStore):
    """An ``ImageStore`` whose uploads are also published to the depot and whose misses are fetched from it."""

    def __init__(self, capacity_bytes: int, depot: Any, preprocess: Callable[[np.ndarray], torch.Tensor]) -> None:
        super().__init__(capacity_bytes)
        self._depot = depot
        self._preprocess = preprocess

    def put(self, images: np.ndarray, preprocess: Callable[[np.ndarray], torch.Tensor], scope: int = 0,
            *, must_store: bool = True) -> tuple[ImageBatch, bool]:
        batch, cached = super().put(images, preprocess, scope, must_store=must_store)
        if must_store and not cached:  # an upload (not inline images, not the probe): other replicas may need it
            import ray

            ray.get(self._depot.put.remote(scope, batch.id, np.ascontiguousarray(images)))
        return batch, cached

    def get(self, key: str, scope: int = 0) -> ImageBatch:
        if self.holds(key, scope):
            return super().get(key, scope)
        import ray

        images = ray.get(self._depot.get.remote(scope, key))
        if images is None:
            return super().get(key, scope)  # NotFoundError: upload it again
        log.info("image batch %s fetched from the depot (uploaded through another replica)", key[:19])
        batch, _ = super().put(images, self._preprocess, scope, must_store=False)
        return batch
