"""The data-set registry on tiny generated copies of CoOp's layouts: found by name, the right classes,
splits and template, CoOp's seeded draw, and errors that name the missing file and where to get it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from bptvlm.client.data import DataError
from bptvlm.client.datasets import DatasetMissingError, coop_sample, dataset_names, get_dataset, open_dataset
from bptvlm.data import check_source, is_dataset, load_data

from .layout import ALL, write_layout

# CoOp's trainers/zsclip.py CUSTOM_TEMPLATES, written out here so a changed catalog entry fails
TEMPLATES = {
    "ImageNet": "a photo of a {}.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "DTD": "{} texture.", "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.", "Flowers102": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
}  # fmt: skip


def test_the_registry_holds_the_papers_nine_and_coops_other_two() -> None:
    assert dataset_names() == list(TEMPLATES)
    assert {get_dataset(n).template for n in TEMPLATES} == set(TEMPLATES.values())
    assert all(get_dataset(n).template == t for n, t in TEMPLATES.items())
    from bptvlm.world.tasks import list_tasks

    assert not [t.name for t in list_tasks() if is_dataset(t.name)]  # no name means two things


@pytest.mark.parametrize("name", ALL)
def test_each_layout_loads_by_name(name: str, tmp_path: Path) -> None:
    written = write_layout(name, tmp_path)
    dataset = open_dataset(name.lower(), tmp_path)  # any case; the folder name works too
    assert open_dataset(get_dataset(name).folder, tmp_path).class_names == dataset.class_names
    assert dataset.class_names == [n.replace("_", " ") for n in written.class_names]
    assert {s: len(v) for s, v in dataset.splits.items.items()} == written.counts
    assert dataset.spec.template == TEMPLATES[name]
    data = load_data(name, seed=1, shots=2, val_shots=1, image_size=8, data_root=str(tmp_path))
    n = len(written.class_names)
    assert data.train_images.shape == (2 * n, 8, 8, 3) and data.train_labels.tolist() == sorted(list(range(n)) * 2)
    assert data.val_labels is not None and data.val_labels.tolist() == list(range(n))
    assert data.test_images.shape[0] == written.counts["test"]
    assert data.template == TEMPLATES[name] and data.class_names == dataset.class_names
    # the generated images saturate channel label % 3: the loaded pixels belong to their labels
    assert (data.train_images.reshape(2 * n, -1, 3).mean(1).argmax(1) == data.train_labels % 3).all()


def test_the_draw_is_coops(tmp_path: Path) -> None:
    """random.seed(seed), then random.sample per label in first-appearance order, train then val."""
    write_layout("OxfordPets", tmp_path)
    dataset = open_dataset("OxfordPets", tmp_path)
    split = json.loads((tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    rng = random.Random(3)
    expect: dict[str, set[str]] = {}
    for part, k in (("train", 3), ("val", 1)):
        by_label: dict[int, list[str]] = {}
        for path, label, _ in split[part]:
            by_label.setdefault(label, []).append(path)
        expect[part] = {p for items in by_label.values() for p in rng.sample(items, k)}
    items = dataset.splits.items
    rng = random.Random(3)
    got_train = {items["train"][i].path.name for i in coop_sample(items["train"], 3, rng)}
    got_val = {items["val"][i].path.name for i in coop_sample(items["val"], 1, rng)}
    assert got_train == expect["train"] and got_val == expect["val"]
    a = dataset.few_shot(3, seed=3, val_shots=1, image_size=8)
    b = dataset.few_shot(3, seed=3, val_shots=1, image_size=8)
    c = dataset.few_shot(3, seed=4, val_shots=1, image_size=8)
    assert np.array_equal(a.train_images, b.train_images) and not np.array_equal(a.train_images, c.train_images)


def test_imagenet_validation_comes_from_the_training_images_left(tmp_path: Path) -> None:
    write_layout("ImageNet", tmp_path)
    data = open_dataset("ImageNet", tmp_path).few_shot(4, seed=1, val_shots=2, image_size=8)
    assert data.val_images is not None and len(data.val_images) == 8
    assert not {x.tobytes() for x in data.train_images} & {x.tobytes() for x in data.val_images}


def test_a_missing_split_file_names_it_and_its_download(tmp_path: Path) -> None:
    write_layout("DTD", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DatasetMissingError, match=r"dtd/split_zhou_DescribableTextures.json not found; get "
                       r"split_zhou_DescribableTextures.json from https://drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"):
        check_source("DTD", data_root=str(tmp_path))


@pytest.mark.parametrize(("name", "remove", "expected"), [
    ("ImageNet", "imagenet/classnames.txt", r"imagenet/classnames.txt not found; get classnames.txt from https://drive"),
    ("FGVCAircraft", "fgvc_aircraft/images_variant_val.txt", r"images_variant_val.txt not found; get images from https://www.robots.ox.ac.uk"),
    ("EuroSAT", "eurosat", r"eurosat not found; create it"),
], ids=["imagenet-classnames", "aircraft-split", "no-folder"])  # fmt: skip
def test_missing_files_are_named(name: str, remove: str, expected: str, tmp_path: Path) -> None:
    import shutil

    write_layout(name, tmp_path)
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetMissingError, match=expected):
        open_dataset(name, tmp_path)


def test_an_incomplete_data_set_names_a_missing_image(tmp_path: Path) -> None:
    write_layout("Food101", tmp_path)
    (tmp_path / "food-101" / "images" / "baklava" / "1200.jpg").unlink()  # a listed image, gone
    with pytest.raises(DataError, match=r"Food101: 1 of 8 images its split lists are missing, e.g. .*baklava/1200.jpg; "
                       r"the data set in .* is incomplete: get images from https://data.vision.ee.ethz.ch"):
        load_data("Food101", seed=1, shots=2, val_shots=0, image_size=8, data_root=str(tmp_path))


def test_unknown_names_and_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"unknown data set 'OxfordPet'; did you mean OxfordPets"):
        get_dataset("OxfordPet")
    monkeypatch.delenv("BPTVLM_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="give --data-root DIR"):
        open_dataset("DTD")
    write_layout("DTD", tmp_path)
    monkeypatch.setenv("BPTVLM_DATA_ROOT", str(tmp_path))
    assert open_dataset("dtd").spec.name == "DTD"
