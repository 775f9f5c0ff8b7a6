"""Few-shot benchmarks by name in CoOp's layout under a root: ``open_dataset("OxfordPets", "DATA")``.

The registry (``registry.py``) holds one ``DatasetSpec`` a data set; ``catalog.py`` registers the
eleven of CoOp's benchmark (the paper's nine, Flowers102 and FGVCAircraft). Sampling is CoOp's:
``random.Random(seed)`` draws ``shots`` images per class from train (``random.sample`` per label, labels
in the order they first appear, all of a class's images when it has fewer), then ``val_shots`` per
class from val with the same generator (ImageNet has no val split: from the training images left).
The test split is the data set's own, whole unless ``test_per_class`` caps it (a fixed draw).
"""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataError, FewShotData, load_image
from . import catalog  # noqa: F401  (registers the data sets)
from .registry import DatasetMissingError, DatasetSpec, Item, Splits, dataset_names, get_dataset, is_dataset, register

__all__ = ["DatasetMissingError", "DatasetSpec", "Item", "LoadedDataset", "Splits", "coop_sample", "dataset_names",
           "get_dataset", "is_dataset", "open_dataset", "register"]

logger = logging.getLogger(__name__)
DATA_ROOT_ENV = "BPTVLM_DATA_ROOT"


def coop_sample(items: list[Item], shots: int, rng: random.Random) -> list[int]:
    """Positions in ``items`` of ``shots`` items per label (CoOp's draw; all of a label's when fewer)."""
    by_label: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_label.setdefault(item.label, []).append(i)
    chosen: list[int] = []
    for positions in by_label.values():
        chosen += rng.sample(positions, shots) if len(positions) >= shots else positions
    return chosen


def resolve_root(data_root: str | Path | None) -> Path:
    """``data_root``, else the environment variable ``BPTVLM_DATA_ROOT``; ``DataError`` without either."""
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DataError(f"a data set by name needs its root folder: give --data-root DIR (data_root=...) or set "
                        f"{DATA_ROOT_ENV}; DIR holds one folder a data set (oxford_pets/, dtd/, ...) as in CoOp's DATASETS.md")
    if not Path(root).expanduser().is_dir():
        raise DataError(f"--data-root {root} does not exist")
    return Path(root).expanduser()


@dataclass
class LoadedDataset:
    """A data set's splits as read from its files (no image read yet)."""

    spec: DatasetSpec
    folder: Path
    splits: Splits

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    def few_shot(self, shots: int, *, seed: int, val_shots: int, image_size: int,
                 test_per_class: int | None = None) -> FewShotData:
        """``shots`` training and ``val_shots`` validation images per class drawn as CoOp does, and the
        test split; images uint8 [N, image_size, image_size, 3], labels int64 [N]."""
        items = self.splits.items
        rng = random.Random(seed)
        train_pos = coop_sample(items["train"], shots, rng)
        pool = items["val"]
        if not pool:  # ImageNet: validation from the training images not drawn as shots
            taken = set(train_pos)
            pool = [item for i, item in enumerate(items["train"]) if i not in taken]
        val = [pool[i] for i in coop_sample(pool, val_shots, rng)] if val_shots else []
        train = [items["train"][i] for i in train_pos]
        self._check_counts(train, shots)
        test = items["test"]
        if test_per_class:
            test = [test[i] for i in sorted(coop_sample(test, test_per_class, random.Random(0)))]
        arrays = [self._load(part, image_size) for part in (train, val, test)]
        (tx, ty), (vx, vy), (sx, sy) = arrays
        return FewShotData(class_names=list(self.class_names), train_images=tx, train_labels=ty, test_images=sx,
                           test_labels=sy, val_images=vx if len(vy) else None, val_labels=vy if len(vy) else None,
                           template=self.spec.template)  # fmt: skip

    def _check_counts(self, train: list[Item], shots: int) -> None:
        counts = np.bincount([i.label for i in train], minlength=len(self.class_names))
        empty = [self.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(f"{self.spec.name}: no training images for {len(empty)} class(es), e.g. {empty[:3]}; the "
                            f"data set in {self.folder} is incomplete: {self.spec.where_to_get(self.spec.image_dir or 'images')}")
        short = [f"'{self.class_names[c]}' has {counts[c]}" for c in np.flatnonzero(counts < shots)]
        if short:
            logger.warning("%s: %d class(es) have fewer than %d training images and use all they have: %s",
                           self.spec.name, len(short), shots, ", ".join(short[:5]))

    def _load(self, items: list[Item], image_size: int) -> tuple[np.ndarray, np.ndarray]:
        order = sorted(range(len(items)), key=lambda i: items[i].label)  # class-major, stable
        items = [items[i] for i in order]
        absent = [i.path for i in items if not i.path.is_file()]
        if absent:
            what = self.spec.image_dir or "images"
            raise DataError(f"{self.spec.name}: {len(absent)} of {len(items)} images its split lists are missing, e.g. "
                            f"{absent[0]}; the data set in {self.folder} is incomplete: {self.spec.where_to_get(what)}")
        if not items:
            return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda p: load_image(p, image_size), (i.path for i in items)))
        return np.stack(images), np.array([i.label for i in items], dtype=np.int64)


def open_dataset(name: str, data_root: str | Path | None = None) -> LoadedDataset:
    """Read the registered data set ``name`` under ``data_root`` (its files, no images);
    ``DatasetMissingError`` naming the file it looked for and where to download it."""
    spec = get_dataset(name)
    folder = spec.root_of(resolve_root(data_root))
    if not folder.is_dir():
        raise DatasetMissingError(f"{spec.name}: {folder} not found; create it and {spec.where_to_get('')}")
    return LoadedDataset(spec, folder, spec.reader(spec, folder))
