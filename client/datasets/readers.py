"""Readers of CoOp's three kinds of layout (file and folder names from CoOp's DATASETS.md and
``datasets/*.py``; this is our own code).

- ``split_file``: ``<folder>/split_zhou_<Name>.json`` = ``{"train"|"val"|"test": [[path relative to
  the image folder, label, class name], ...]}`` (eight of the eleven data sets, and Flowers102).
- ``imagenet_folders``: ``imagenet/images/{train,val}/<wnid>/*`` and ``imagenet/classnames.txt``
  (``<wnid> <class name>`` a line); labels follow the sorted wnid folders; ``val`` is the test split
  and there is no validation split (CoOp's practice).
- ``aircraft_files``: ``fgvc_aircraft/variants.txt`` (one class a line, its label the line number),
  ``images_variant_{train,val,test}.txt`` (``<image id> <variant>`` a line) and ``images/<id>.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import IMAGE_SUFFIXES, DataError
from .registry import DatasetSpec, Item, Splits, missing


def _require(spec: DatasetSpec, folder: Path, name: str, *, is_dir: bool = False) -> Path:
    path = folder / name
    if not (path.is_dir() if is_dir else path.is_file()):
        raise missing(spec, path, name)
    return path


def _names_by_label(pairs: dict[int, str], source: Path) -> list[str]:
    """Class names indexed by label 0..C-1; ``DataError`` for labels with a gap."""
    labels = sorted(pairs)
    if labels != list(range(len(labels))):
        gaps = sorted(set(range(max(labels) + 1)) - set(labels))[:5]
        raise DataError(f"{source}: labels must be 0..{max(labels)} without gaps; no item has label {gaps}")
    return [pairs[k] for k in labels]


def split_file(spec: DatasetSpec, folder: Path) -> Splits:
    """CoOp's split JSON; class names with ``_`` as a space (as CoOp's prompt learners write them)."""
    assert spec.split_file is not None
    path = _require(spec, folder, spec.split_file)
    images = _require(spec, folder, spec.image_dir, is_dir=True) if spec.image_dir else folder
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); {spec.where_to_get(spec.split_file)}") from None
    if not isinstance(raw, dict) or any(s not in raw for s in ("train", "val", "test")):
        raise DataError(f"{path} must be an object with lists 'train', 'val' and 'test' (CoOp's split format)")
    names: dict[int, str] = {}
    items: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        items[split] = []
        for n, entry in enumerate(raw[split]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int) and isinstance(entry[2], str)):
                raise DataError(f"{path}: {split}[{n}] is {entry!r}; expected [relative path, label, class name]")
            rel, label, name = entry
            if names.setdefault(label, name) != name:
                raise DataError(f"{path}: label {label} is both {names[label]!r} and {name!r}")
            items[split].append(Item(images / rel, label))
    if not names:
        raise DataError(f"{path} lists no images; {spec.where_to_get(spec.split_file)}")
    return Splits([n.replace("_", " ") for n in _names_by_label(names, path)], items)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def imagenet_folders(spec: DatasetSpec, folder: Path) -> Splits:
    """ImageNet's class folders under ``images/train`` and ``images/val`` and CoOp's ``classnames.txt``."""
    listing = _require(spec, folder, "classnames.txt")
    train_dir = _require(spec, folder, "images/train", is_dir=True)
    val_dir = _require(spec, folder, "images/val", is_dir=True)
    names: dict[str, str] = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name.strip()
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unnamed = [w for w in wnids if w not in names]
    if unnamed:
        raise DataError(f"{listing} has no class name for the folder(s) {unnamed[:5]} of {train_dir}; "
                        f"{spec.where_to_get('classnames.txt')}")
    if not wnids:
        raise missing(spec, train_dir / "n01440764", "images")
    items: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for label, wnid in enumerate(wnids):
        for split, base in (("train", train_dir), ("test", val_dir)):
            if not (base / wnid).is_dir():
                raise missing(spec, base / wnid, "images")
            items[split] += [Item(p, label) for p in _image_files(base / wnid)]
    return Splits([names[w] for w in wnids], items)


def aircraft_files(spec: DatasetSpec, folder: Path) -> Splits:
    """FGVC-Aircraft's ``variants.txt`` and ``images_variant_<split>.txt`` (the 2013b archive's ``data/``)."""
    classes = [line.strip() for line in _require(spec, folder, "variants.txt").read_text().splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(classes)}
    images = _require(spec, folder, "images", is_dir=True)
    items: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        listing = _require(spec, folder, f"images_variant_{split}.txt")
        items[split] = []
        for n, line in enumerate(listing.read_text().splitlines()):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DataError(f"{listing}:{n + 1}: variant {variant!r} is not in {folder / 'variants.txt'}")
            items[split].append(Item(images / f"{image_id}.jpg", label_of[variant]))
    return Splits(classes, items)
