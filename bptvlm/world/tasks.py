"""The few-shot task suite: a registry of named tasks with seeded train/val/test splits.

Adding a task is one `register(Task(...), loader)` call. Splits:
- test: fixed per task (independent of `seed`), so every seed is scored on the same images;
- train (`shots` per class) and val (`n_val` per class): drawn from `seed`, disjoint from test.
Seeds are numeric (`zlib.crc32` of the task name, never Python's `hash`).

Images are uint8 [N, 32, 32, 3]; labels int64 [N], balanced per class.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bptvlm.world.render import (BACKGROUNDS, COLOURS, COUNT_WORDS, IMAGE_SIZE, SHAPES, Scene, digit_pool,
                                 render)

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
_ROLE_TEST, _ROLE_TRAIN, _ROLE_VAL = 0, 1, 2


@dataclass(frozen=True)
class Task:
    """A named few-shot classification task: its class names and its zero-shot template."""

    name: str
    description: str
    class_names: tuple[str, ...]
    template: str  # e.g. "a photo of a {}."
    suite: bool = True  # False: a pretraining check with no headroom, left out of `bptvlm demo`'s default suite


@dataclass
class TaskData:
    """Splits of one task. Images uint8 [N, H, W, 3], labels int64 [N]."""

    class_names: tuple[str, ...]
    template: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# A loader turns (task, seed, shots, n_val, n_test) into TaskData.
Loader = Callable[[Task, int, int, int, int], TaskData]
_REGISTRY: dict[str, tuple[Task, Loader]] = {}


def register(task: Task, loader: Loader) -> None:
    """Add a task to the suite; names are unique."""
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = (task, loader)


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name][0]


def list_tasks(suite_only: bool = False) -> list[Task]:
    """Registered tasks in registration order (`suite_only`: those `bptvlm demo` tunes by default)."""
    return [task for task, _ in _REGISTRY.values() if task.suite or not suite_only]


def load_task(name: str, *, shots: int = 16, seed: int = 0, n_val: int = 8, n_test: int = 50) -> TaskData:
    """Seeded splits of task `name`: `shots`, `n_val` and `n_test` images per class."""
    task = get_task(name)
    if shots < 1 or n_val < 0 or n_test < 1:
        raise ValueError(f"need shots >= 1, n_val >= 0, n_test >= 1; got {shots}, {n_val}, {n_test}")
    return _REGISTRY[name][1](task, seed, shots, n_val, n_test)


def _rng(task: Task, role: int, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(task.name.encode()), role, seed])


def _labels(n_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes, dtype=np.int64), per_class)


def _assemble(task: Task, splits: list[tuple[np.ndarray, np.ndarray]]) -> TaskData:
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    return TaskData(task.class_names, task.template, xtr, ytr, xva, yva, xte, yte)


# --------------------------------------------------------------------------- synthetic tasks

SceneFn = Callable[[int, np.random.Generator], Scene]


def synthetic(scene_fn: SceneFn) -> Loader:
    """A loader that renders `scene_fn(label, rng)` scenes with held-out texture crops."""

    def load(task: Task, seed: int, shots: int, n_val: int, n_test: int) -> TaskData:
        splits = []
        for role, per_class, s in ((_ROLE_TRAIN, shots, seed), (_ROLE_VAL, n_val, seed), (_ROLE_TEST, n_test, 0)):
            rng = _rng(task, role, s)
            labels = _labels(len(task.class_names), per_class)
            images = [render(scene_fn(int(y), rng), rng, "task") for y in labels]
            empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            splits.append((np.stack(images) if images else empty, labels))
        return _assemble(task, splits)

    return load


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _single(rng: np.random.Generator, **fixed: str | int) -> Scene:
    attrs: dict = dict(kind="shapes", colour=_pick(rng, list(COLOURS)), background=_pick(rng, BACKGROUNDS),
                       shape=_pick(rng, SHAPES), count=1, size=_pick(rng, ("large", "small")))
    attrs.update(fixed)
    return Scene(**attrs)


def _multi(rng: np.random.Generator, **fixed: str | int) -> Scene:
    count = int(fixed.pop("count", rng.integers(1, 5)))
    return _single(rng, count=count, size="small", **fixed)


_SHAPE_COLOUR = [(c, s) for c in ("red", "green", "blue") for s in ("circle", "triangle", "star")]
_COLOUR_SYNONYMS = ("crimson", "amber", "golden", "emerald", "turquoise", "navy", "violet", "magenta")
_SHAPE_SYNONYMS = ("disk", "block", "wedge", "asterisk", "plus", "rhombus")


# --------------------------------------------------------------------------- real-digit tasks


def pooled(pool_fn: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Loader:
    """A loader that draws images per class from a fixed pool (uint8 [n, 32, 32, 3], labels)."""

    def load(task: Task, seed: int, shots: int, n_val: int, n_test: int) -> TaskData:
        images, labels = pool_fn()
        parts: list[list[np.ndarray]] = [[], [], []]
        for c in range(len(task.class_names)):
            idx = np.flatnonzero(labels == c)
            idx = idx[_rng(task, _ROLE_TEST).permutation(len(idx))]
            if len(idx) < n_test + shots + n_val:
                raise ValueError(f"task {task.name!r} class {c} has {len(idx)} images; "
                                 f"asked for {n_test} test + {shots} train + {n_val} val")
            rest = idx[n_test:][_rng(task, _ROLE_TRAIN, seed).permutation(len(idx) - n_test)]
            parts[0].append(rest[:shots])
            parts[1].append(rest[shots:shots + n_val])
            parts[2].append(idx[:n_test])
        splits = []
        for per_class in (parts[0], parts[1], parts[2]):
            sel = np.concatenate(per_class)
            splits.append((images[sel], labels[sel].astype(np.int64)))
        return _assemble(task, splits)

    return load


@functools.lru_cache(maxsize=1)
def _mnist_task_pool() -> tuple[np.ndarray, np.ndarray]:
    """Held-out MNIST glyphs drawn in colour on held-out backgrounds (fixed seed)."""
    glyphs, labels = digit_pool("task")
    rng = np.random.default_rng(31337)
    images = [render(Scene(kind="digit", colour=_pick(rng, list(COLOURS)), background=_pick(rng, BACKGROUNDS)),
                     rng, "task", g) for g in glyphs]
    return np.stack(images), labels


@functools.lru_cache(maxsize=1)
def _uci_pool() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI digits (8x8, 0..16) upsampled to 32 px, white on black: a domain shift."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for im in digits.images:
        small = Image.fromarray((im * (255.0 / 16.0)).astype(np.uint8))
        big = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
        images.append(np.repeat(big[:, :, None], 3, axis=2))
    return np.stack(images), digits.target.astype(np.int64)


# --------------------------------------------------------------------------- the suite

register(Task("shape", "one shape (any colour, size, background): which shape",
              SHAPES, "a photo of a {}."),
         synthetic(lambda y, rng: _single(rng, shape=SHAPES[y])))
register(Task("colour", "one shape's colour, no distractors: a pretraining check (zero-shot ~1.0, nothing to tune)",
              tuple(COLOURS), "a photo of a {} shape.", suite=False),
         synthetic(lambda y, rng: _single(rng, colour=list(COLOURS)[y])))
register(Task("colour_clutter", "a large shape of one colour among small shapes of other colours",
              tuple(COLOURS), "a photo of a {} shape."),
         synthetic(lambda y, rng: _single(rng, colour=list(COLOURS)[y], size="large", clutter=3)))
register(Task("count", "how many copies of a shape (1-4)",
              tuple(f"{w} shape" if w == "one" else f"{w} shapes" for w in COUNT_WORDS), "a photo of {}."),
         synthetic(lambda y, rng: _multi(rng, count=y + 1)))
register(Task("background", "the texture behind the shapes",
              BACKGROUNDS, "a photo of a shape on {}."),
         synthetic(lambda y, rng: _multi(rng, background=BACKGROUNDS[y])))
register(Task("digit", "held-out MNIST digits drawn in colour on textures",
              DIGIT_NAMES, "a photo of a digit {}."),
         pooled(_mnist_task_pool))
register(Task("uci_digit", "scikit-learn's 8x8 UCI digits upsampled, grey on black (domain shift)",
              DIGIT_NAMES, "a photo of a digit {}."),
         pooled(_uci_pool))
register(Task("shape_colour", "colour and shape together, among small distractors",
              tuple(f"{c} {s}" for c, s in _SHAPE_COLOUR), "a photo of a {}."),
         synthetic(lambda y, rng: _single(rng, colour=_SHAPE_COLOUR[y][0], shape=_SHAPE_COLOUR[y][1], clutter=2)))
register(Task("shape_synonym", "the shape task with class names the captions never use",
              _SHAPE_SYNONYMS, "a photo of a {}."),
         synthetic(lambda y, rng: _single(rng, shape=SHAPES[y])))
register(Task("colour_synonym", "one shape's colour, named with words the captions never use",
              _COLOUR_SYNONYMS, "a photo of a {} shape."),
         synthetic(lambda y, rng: _single(rng, colour=list(COLOURS)[y])))


def export_task(name: str, out_dir: Path, *, shots: int = 16, seed: int = 0) -> Path:
    """Write a task as an ImageFolder: out_dir/{train,test}/<class_with_underscores>/<index>.png."""
    data = load_task(name, shots=shots, seed=seed)
    out_dir = Path(out_dir)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        for i, (img, y) in enumerate(zip(images, labels)):
            folder = out_dir / split / data.class_names[int(y)].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png")
    return out_dir
