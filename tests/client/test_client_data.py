"""ImageFolderDataset and few-shot sampling on folders generated with PIL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bptvlm.client.data import DataError, ImageFolderDataset, load_image, sample_few_shot


def test_presplit_folder(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"golden_retriever": 5, "cat": 4}, split=True, test_counts={"golden_retriever": 2, "cat": 3})
    ds = ImageFolderDataset(root, image_size=8)
    assert ds.presplit and ds.class_names == ["cat", "golden retriever"]  # sorted folder names, '_' -> ' '
    images, labels = ds.load("train")
    assert images.shape == (9, 8, 8, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 4 + [1] * 5
    assert ds.load("test")[1].tolist() == [0] * 3 + [1] * 2


def test_flat_folder_is_split_by_seed(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"a": 10, "b": 10})
    ds = ImageFolderDataset(root, image_size=8, seed=0, test_fraction=0.3)
    train, test = ds._files("train"), ds._files("test")
    assert len(train) == 14 and len(test) == 6
    assert not {f for f, _ in train} & {f for f, _ in test}
    again = ImageFolderDataset(root, image_size=8, seed=0, test_fraction=0.3)._files("test")
    other = ImageFolderDataset(root, image_size=8, seed=1, test_fraction=0.3)._files("test")
    assert again == test and other != test


def test_few_shot_reads_shots_and_val(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"a": 6, "b": 6}, split=True, test_counts={"a": 2, "b": 2})
    data = ImageFolderDataset(root, image_size=8).few_shot(3, seed=0, n_val=2)
    assert data.class_names == ["a", "b"]
    assert data.train_images.shape == (6, 8, 8, 3) and data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.val_images is not None and data.val_labels is not None and data.val_labels.tolist() == [0, 0, 1, 1]
    assert data.test_images.shape == (4, 8, 8, 3)
    pixels = {img.tobytes() for img in data.train_images}
    assert not pixels & {img.tobytes() for img in data.val_images}


def test_load_image_is_rgb_square_centre_crop(tmp_path: Path) -> None:
    from PIL import Image

    gray = np.zeros((10, 30), np.uint8)
    gray[:, 10:20] = 255  # a white centre third
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png", 6)
    assert img.shape == (6, 6, 3) and img.dtype == np.uint8
    assert img[:, 1:5].min() > 200  # the crop keeps the centre of a wide image


def test_sample_few_shot_is_seeded_and_class_major() -> None:
    labels = np.array([0, 1, 2] * 10)
    train, val = sample_few_shot(labels, 4, seed=0, n_val=3)
    assert labels[train].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert labels[val].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert not set(train) & set(val)
    again, _ = sample_few_shot(labels, 4, seed=0)
    other, _ = sample_few_shot(labels, 4, seed=1)
    assert again.tolist() == train.tolist() and other.tolist() != train.tolist()


def test_short_val_split_takes_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    train, val = sample_few_shot(np.array([0] * 5), 4, n_val=3)
    assert len(train) == 4 and len(val) == 1
    assert "only some of the 3 validation images a class are left after 4 shots: '0' has 1" in caplog.text


def test_too_few_images_for_the_shots(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"many": 5, "few_ones": 2}, split=True)
    with pytest.raises(DataError, match="class 'few ones' has 2 training images, fewer than shots=3"):
        ImageFolderDataset(root, image_size=8).few_shot(3)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", 8)
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="1 class folder .*at least 2 classes"):  # a one-class folder scores 1.0
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="class 'cls' has no images"):
        ImageFolderDataset(tmp_path, 8).load("train")


@pytest.mark.parametrize("mode", ["L", "I;16", "I", "RGB", "RGBA", "LA", "P-transparent", "CMYK", "F"])
def test_every_image_mode_loads_as_what_it_shows(tmp_path: Path, mode: str) -> None:
    """Mid-grey loads as mid-grey whatever the bit depth (16-bit PNGs are scaled, not truncated to
    white); transparent pixels show the stated background (white), opaque ones their colour."""
    from PIL import Image

    from bptvlm.client.data import load_image

    white = (255, 255, 255)  # the stated background (client.data.BACKGROUND)

    grey = np.full((8, 8), 128, np.uint8)
    if mode in ("I;16", "I"):
        img = Image.fromarray(grey.astype(np.uint16) * 257)  # a 16-bit grey PNG
        img = img if mode == "I;16" else img.convert("I")
    elif mode == "F":
        img = Image.fromarray(grey.astype(np.float32) / 255.0, mode="F")
    elif mode in ("RGBA", "LA", "P-transparent"):
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[:4] = (128, 128, 128, 255)  # top half opaque grey, bottom half transparent black
        img = Image.fromarray(rgba, mode="RGBA")
        if mode == "LA":
            img = img.convert("LA")
        elif mode == "P-transparent":
            img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
            img.info["transparency"] = img.getpixel((0, 7))
    else:
        img = Image.fromarray(np.stack([grey] * 3, -1), mode="RGB").convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("F", "I", "CMYK") else "x.png")
    img.save(path)
    pixels = load_image(path, 8).astype(int)
    if mode in ("RGBA", "LA", "P-transparent"):
        assert np.abs(pixels[:3] - 128).max() <= 2 and (pixels[5:] == white).all()
    else:
        assert np.abs(pixels - 128).max() <= 2, (mode, pixels.mean())


def test_unreadable_image_is_named(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"a": 2, "b": 2})
    (root / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        _load_all(root)


def _load_all(root: Path) -> None:
    ds = ImageFolderDataset(root, 8)
    ds.load("train")
    ds.load("test")


def test_train_and_test_classes_must_match(image_folder: Callable[..., Path]) -> None:
    root = image_folder({"a": 2, "b": 2}, split=True, test_counts={"a": 2, "c": 2})
    with pytest.raises(DataError, match=r"only in train \['b'\], only in test \['c'\]"):
        ImageFolderDataset(root, 8)
