"""Few-shot image classification data on the client side.

``ImageFolderDataset`` reads ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or ``DIR/<class>/*``,
split by seed); class names are folder names with ``_`` as a space, sorted. ``sample_few_shot`` takes
``shots`` images per class (plus an optional validation split). ``FewShotData`` is what tuning needs;
built-in tasks (``bptvlm.world.tasks.TaskData``) have the same fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class DataError(ValueError):
    """A data folder or split that cannot be used, with what was found and what was needed."""


class TaskLike(Protocol):
    """Fields tuning reads (``FewShotData`` and ``bptvlm.world.tasks.TaskData`` both have them)."""

    @property
    def class_names(self) -> Sequence[str]: ...
    @property
    def train_images(self) -> np.ndarray: ...  # uint8 [N, H, W, 3]
    @property
    def train_labels(self) -> np.ndarray: ...  # int64 [N]
    @property
    def val_images(self) -> np.ndarray | None: ...
    @property
    def val_labels(self) -> np.ndarray | None: ...
    @property
    def test_images(self) -> np.ndarray: ...
    @property
    def test_labels(self) -> np.ndarray: ...


@dataclass
class FewShotData:
    """A few-shot task: images uint8 [N, H, W, 3], labels int64 [N] indexing ``class_names``."""

    class_names: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    template: str | None = None


def class_name_of(folder: str) -> str:
    """``golden_retriever`` -> ``golden retriever``."""
    return folder.replace("_", " ")


BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited over: white, as an image viewer shows them."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16- and 32-bit integer images (``I;16*``, ``I``) are scaled from
    their full range (65535 for 16-bit, not truncated, which turns them white), floats (``F``) from
    [0, 1], and transparency (``RGBA``, ``LA``, ``PA``, a palette's transparent index) is
    alpha-composited over ``BACKGROUND``."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
        img = Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] (``to_rgb``): shorter side resized to ``size`` (bicubic), then centre-cropped."""
    try:
        with Image.open(path) as file:
            img: Image.Image = to_rgb(file)
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < len(files):
        logger.debug("%s: ignoring %d files without an image suffix", folder, len(files) - len(images))
    return images


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    return folders


class ImageFolderDataset:
    """Images of an ImageFolder tree, resized to ``image_size`` (the server's, from its metadata).

    With ``DIR/train`` and ``DIR/test`` the splits are those folders (their class sets must match);
    otherwise each class of ``DIR/<class>`` is split at random (``seed``) with ``test_fraction`` to test.
    """

    def __init__(self, root: str | Path, image_size: int, *, seed: int = 0, test_fraction: float = 0.5) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist")
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), received {test_fraction}")
        self.image_size = image_size
        self.seed = seed
        self.test_fraction = test_fraction
        self.presplit = (self.root / "train").is_dir() and (self.root / "test").is_dir()
        if self.presplit:
            train = [p.name for p in _class_folders(self.root / "train")]
            test = [p.name for p in _class_folders(self.root / "test")]
            if train != test:
                raise DataError(
                    f"{self.root}: train and test class folders differ: only in train {sorted(set(train) - set(test))}, "
                    f"only in test {sorted(set(test) - set(train))}"
                )
            self.folders = train
        else:
            self.folders = [p.name for p in _class_folders(self.root)]
        self.class_names = [class_name_of(f) for f in self.folders]
        if len(self.class_names) < 2:
            raise DataError(f"{self.root} has {len(self.class_names)} class folder ({', '.join(self.folders)}): "
                            "classification needs at least 2 classes (expected <class>/<image files>, one folder a class)")

    def _files(self, split: str) -> list[tuple[Path, int]]:
        """(path, label) pairs of ``split`` ("train" or "test")."""
        pairs: list[tuple[Path, int]] = []
        rng = np.random.default_rng(self.seed)
        for label, folder in enumerate(self.folders):
            base = self.root / split / folder if self.presplit else self.root / folder
            files = _image_files(base)
            if not files:
                raise DataError(f"class '{self.class_names[label]}' has no images in {base}")
            if not self.presplit:
                order = rng.permutation(len(files))  # drawn for every class, whatever the split
                n_test = max(1, round(len(files) * self.test_fraction)) if len(files) > 1 else 0
                chosen = order[:n_test] if split == "test" else order[n_test:]
                files = [files[i] for i in sorted(chosen)]
            pairs.extend((f, label) for f in files)
        return pairs

    def load(self, split: str, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [N, S, S, 3] and labels int64 [N] of a split (optionally a subset by index)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', received {split!r}")
        pairs = self._files(split)
        if indices is not None:
            pairs = [pairs[i] for i in indices]
        if not pairs:
            raise DataError(f"{self.root}: the {split} split is empty")
        images = np.stack([load_image(path, self.image_size) for path, _ in pairs])
        labels = np.array([label for _, label in pairs], dtype=np.int64)
        return images, labels

    def labels(self, split: str) -> np.ndarray:
        """Labels int64 [N] of a split, without reading any image."""
        return np.array([label for _, label in self._files(split)], dtype=np.int64)

    def few_shot(self, shots: int, *, seed: int = 0, n_val: int = 0) -> FewShotData:
        """``shots`` training images per class (+ ``n_val`` validation per class) and the full test split.

        Only the sampled training images are read from disk.
        """
        train_labels = self.labels("train")
        train_idx, val_idx = sample_few_shot(train_labels, shots, seed=seed, n_val=n_val, class_names=self.class_names)
        train_images, train_labels_s = self.load("train", train_idx)
        val_images = val_labels = None
        if len(val_idx):
            val_images, val_labels = self.load("train", val_idx)
        test_images, test_labels = self.load("test")
        return FewShotData(
            class_names=list(self.class_names),
            train_images=train_images,
            train_labels=train_labels_s,
            test_images=test_images,
            test_labels=test_labels,
            val_images=val_images,
            val_labels=val_labels,
        )


def sample_few_shot(
    labels: np.ndarray,
    shots: int,
    *,
    seed: int = 0,
    n_val: int = 0,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``shots`` training and up to ``n_val`` validation examples per class (disjoint).

    labels: int [N]. Returns (train_idx [C*shots], val_idx [<= C*n_val]), class-major.
    Raises ``DataError`` when a class has fewer than ``shots`` examples.
    """
    if shots < 1:
        raise DataError(f"shots must be >= 1, received {shots}")
    if n_val < 0:
        raise DataError(f"n_val must be >= 0, received {n_val}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = range(len(class_names)) if class_names is not None else np.unique(labels)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    short: list[str] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        name = class_names[int(c)] if class_names is not None else str(c)
        if len(idx) < shots:
            raise DataError(f"class '{name}' has {len(idx)} training images, fewer than shots={shots}")
        idx = rng.permutation(idx)
        train.append(np.sort(idx[:shots]))
        extra = idx[shots : shots + n_val]
        if len(extra) < n_val:
            short.append(f"'{name}' has {len(extra)}")
        val.append(np.sort(extra))
    if short:  # said once, with how to get them
        logger.warning("only some of the %d validation images a class are left after %d shots: %s. The final prompt is chosen "
                       "on validation (the template is always a candidate); for more, use fewer --shots or, for a "
                       "folder without train/ and test/, a smaller --test-fraction", n_val, shots, ", ".join(short))
    return np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64) if val else np.zeros(0, np.int64)
