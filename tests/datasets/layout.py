"""Tiny copies of CoOp's data-set layouts: the real folder and file names, a few images a class.

``write_layout(name, root)`` writes one data set under ``root`` (CoOp's $DATA) and returns what a
reader must find: the class names by label (as CoOp spells them, ``_`` included) and the split sizes.
Images are 16x16 JPEGs whose k-th class saturates colour channel k % 3 (a signal a prompt can learn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COUNTS = {"train": 4, "val": 2, "test": 2}  # images a class and split


@dataclass
class Written:
    folder: Path
    class_names: list[str]  # by label, as the data set's files spell them
    counts: dict[str, int]  # images a split


# data set -> (folder, image folder, split file, class names by label, relative path of image i of class c)
SPLIT_SETS = {
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json", ["indoor abbey", "airport_terminal", "outdoor apartment_building", "arch"],
               lambda c, n, i: f"{n[0]}/{n.replace(' ', '_')}/sun_{c:03d}{i:04d}.jpg"),
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", ["face", "leopard", "motorbike", "yin_yang"],
                   lambda c, n, i: f"{n}/image_{i:04d}.jpg"),
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", ["abyssinian", "american_bulldog", "beagle", "bengal", "birman"],
                   lambda c, n, i: f"{n.title().replace(' ', '_')}_{i}.jpg"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                     ["2012 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan", "2007 BMW X5 SUV"],
                     lambda c, n, i: f"cars_{'test' if i >= 6 else 'train'}/{c * 100 + i:05d}.jpg"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json", ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"],
                lambda c, n, i: f"{n}/{1000 + c * 100 + i}.jpg"),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json", ["banded", "blotchy", "braided", "bubbly"],
            lambda c, n, i: f"{n}/{n}_{i:04d}.jpg"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json", ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road"],
                lambda c, n, i: f"{['AnnualCrop', 'Forest', 'HerbaceousVegetation', 'Highway'][c]}/x_{i + 1}.jpg"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Baby_Crawling"],
               lambda c, n, i: f"{n}/v_{n.replace('_', '')}_g{i:02d}_c01.jpg"),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"],
                   lambda c, n, i: f"image_{c * 100 + i + 1:05d}.jpg"),
}
IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark", "n01491361": "tiger shark"}
AIRCRAFT = ["707-320", "727-200", "A300B4", "F-16A/B"]


def _image(path: Path, label: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
    pixels[..., label % 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def _split_set(name: str, root: Path) -> Written:
    folder_name, image_dir, split_file, names, rel = SPLIT_SETS[name]
    folder = root / folder_name
    images = folder / image_dir if image_dir else folder
    split: dict[str, list[list[object]]] = {s: [] for s in COUNTS}
    for label, cname in enumerate(names):
        i = 0
        for s, count in COUNTS.items():
            for _ in range(count):
                path = rel(label, cname, i)
                _image(images / path, label, label * 100 + i)
                split[s].append([path, label, cname])
                i += 1
    (folder / split_file).write_text(json.dumps(split))
    return Written(folder, names, {s: c * len(names) for s, c in COUNTS.items()})


def _imagenet(root: Path) -> Written:
    folder = root / "imagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET.items()))
    for label, wnid in enumerate(sorted(IMAGENET)):
        for s, count in (("train", COUNTS["train"] + COUNTS["val"]), ("val", COUNTS["test"])):
            for i in range(count):
                _image(folder / "images" / s / wnid / f"{wnid}_{i}.JPEG", label, label * 100 + i + (50 if s == "val" else 0))
    n = len(IMAGENET)
    return Written(folder, [IMAGENET[w] for w in sorted(IMAGENET)],
                   {"train": (COUNTS["train"] + COUNTS["val"]) * n, "val": 0, "test": COUNTS["test"] * n})


def _aircraft(root: Path) -> Written:
    folder = root / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("".join(v + "\n" for v in AIRCRAFT))
    lines: dict[str, list[str]] = {s: [] for s in COUNTS}
    for label, variant in enumerate(AIRCRAFT):
        for s, count in COUNTS.items():
            for _ in range(count):
                image_id = f"{1000000 + label * 1000 + len(lines[s]) * 7 + len(s)}"
                _image(folder / "images" / f"{image_id}.jpg", label, int(image_id) % 997)
                lines[s].append(f"{image_id} {variant}")
    for s, rows in lines.items():
        (folder / f"images_variant_{s}.txt").write_text("\n".join(rows) + "\n")
    return Written(folder, AIRCRAFT, {s: c * len(AIRCRAFT) for s, c in COUNTS.items()})


def write_layout(name: str, root: Path) -> Written:
    """One data set's tiny copy under ``root``."""
    own = {"ImageNet": _imagenet, "FGVCAircraft": _aircraft}
    return own[name](root) if name in own else _split_set(name, root)


ALL = ["ImageNet", *SPLIT_SETS, "FGVCAircraft"]
