"""The task registry: every task loads, splits are seeded, export writes an ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bptvlm.world.tasks import Task, TaskData, export_task, get_task, list_tasks, load_task, register

TASK_NAMES = [t.name for t in list_tasks()]
SMALL = dict(shots=2, n_val=1, n_test=3)


def test_suite_has_the_promised_tasks() -> None:
    assert len(TASK_NAMES) >= 6
    for name in ("shape", "colour_clutter", "count", "background", "digit", "uci_digit", "shape_colour"):
        assert name in TASK_NAMES


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loads_balanced_uint8_splits(name: str) -> None:
    task = get_task(name)
    data = load_task(name, **SMALL)
    n = len(task.class_names)
    assert isinstance(data, TaskData) and data.class_names == task.class_names and "{}" in data.template
    for images, labels, per_class in ((data.train_images, data.train_labels, 2),
                                      (data.val_images, data.val_labels, 1),
                                      (data.test_images, data.test_labels, 3)):
        assert images.dtype == np.uint8 and images.shape == (n * per_class, 32, 32, 3)
        assert labels.dtype == np.int64
        assert np.array_equal(np.bincount(labels, minlength=n), np.full(n, per_class))


@pytest.mark.parametrize("name", ["shape", "digit", "uci_digit"])
def test_splits_are_seeded(name: str) -> None:
    a, b, c = (load_task(name, **SMALL, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.val_images, b.val_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert np.array_equal(a.test_images, c.test_images)  # one fixed test set for every seed


def test_real_digit_train_and_test_are_disjoint() -> None:
    data = load_task("uci_digit", shots=16, n_val=8, n_test=50)
    train = {im.tobytes() for im in data.train_images}
    assert not train & {im.tobytes() for im in data.test_images}


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="shape"):
        get_task("no-such-task")


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(Task("shape", "dup", ("a",), "{}"), lambda *a: None)  # type: ignore[arg-type,return-value]


def test_export_writes_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    out = export_task("count", tmp_path / "count", shots=2, seed=0)
    task = get_task("count")
    for split, per_class in (("train", 2), ("test", 50)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(c.replace(" ", "_") for c in task.class_names)
        for folder in folders:
            files = list((out / split / folder).glob("*.png"))
            assert len(files) == per_class
        assert np.asarray(Image.open(files[0])).shape == (32, 32, 3)


def test_suite_leaves_out_only_checks_without_headroom() -> None:
    suite = [t.name for t in list_tasks(suite_only=True)]
    assert len(suite) >= 6 and "colour" not in suite
    assert [t.name for t in list_tasks() if not t.suite] == ["colour"]
