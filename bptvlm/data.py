"""Few-shot data by name: a built-in task of the embedded world, an ImageFolder directory, or a
benchmark in CoOp's layout under a data root (``bptvlm.client.datasets``: OxfordPets, DTD, ...).

One resolver for ``tune``, ``eval``, ``bench``, ``demo`` and the Python API. Every method of a run sees
the same images: ``shots`` training images per class, ``val_shots`` validation images per class drawn
from the training pool (disjoint from the shots and from test; the final prompt is chosen on them), and
a test split that is scored only, never used to choose anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bptvlm.client.data import DataError, FewShotData, ImageFolderDataset, TaskLike


def _task_names() -> list[str]:
    from bptvlm.world.tasks import list_tasks

    return [t.name for t in list_tasks()]


def is_dataset(spec: str) -> bool:
    """A bare name of a registered benchmark (``OxfordPets``, ``oxford_pets``); ``./dtd`` is a folder."""
    from bptvlm.client.datasets import is_dataset as registered

    return "/" not in spec and registered(spec)


def is_folder(spec: str) -> bool:
    """A spec naming a directory (``./data/pets``) rather than a built-in task (``shape``) or a
    registered benchmark (``DTD``); a bare name that is both a task and a folder is an error naming both
    (``./shape`` is the folder)."""
    if "/" in spec:
        return True
    if is_dataset(spec):
        return False
    if Path(spec).is_dir():
        if spec in _task_names():
            raise DataError(f"{spec!r} is both the built-in task {spec!r} and the folder {Path(spec).resolve()}: "
                            f"write ./{spec} for the folder, or run from another directory for the task")
        return True
    return False


def check_source(spec: str, *, folder: bool | None = None, data_root: str | None = None) -> None:
    """The local checks of a data source, before any server is asked: the task exists, the folder
    exists with at least two class folders, or the benchmark's files are in place (no image is read)."""
    if folder is not True and is_dataset(spec):
        from bptvlm.client.datasets import open_dataset

        open_dataset(spec, data_root)
    elif folder if folder is not None else is_folder(spec):
        ImageFolderDataset(spec, 1)
    else:
        names = _task_names()
        if spec not in names:
            import difflib

            close = difflib.get_close_matches(spec, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known tasks: {', '.join(names)}"
            raise DataError(f"unknown task {spec!r}{hint} (a folder: give --data DIR)")


def load_data(
    spec: str,
    *,
    seed: int,
    shots: int,
    val_shots: int,
    image_size: int,
    test_per_class: int = 50,
    test_fraction: float = 0.5,
    folder: bool | None = None,
    data_root: str | None = None,
    dataset_test_per_class: int | None = None,
) -> TaskLike:
    """Train/val/test splits of ``spec`` for ``seed`` (the test split does not depend on the seed).

    ``folder``: True/False forces an ImageFolder/a built-in task; None decides by ``is_folder``. A
    registered benchmark (``is_dataset``) is read under ``data_root``, its test split whole unless
    ``dataset_test_per_class`` caps it.
    """
    if folder is not True and is_dataset(spec):
        from bptvlm.client.datasets import open_dataset

        return open_dataset(spec, data_root).few_shot(shots, seed=seed, val_shots=val_shots, image_size=image_size,
                                                      test_per_class=dataset_test_per_class)
    if folder if folder is not None else is_folder(spec):
        dataset = ImageFolderDataset(spec, image_size, seed=0, test_fraction=test_fraction)  # one test split for all seeds
        data: FewShotData = dataset.few_shot(shots, seed=seed, n_val=val_shots)
        return data
    from bptvlm.world.tasks import load_task

    check_source(spec, folder=False)
    return load_task(spec, shots=shots, seed=seed, n_val=val_shots, n_test=test_per_class)


def load_test_split(spec: str, *, image_size: int, test_fraction: float = 0.5, folder: bool | None = None,
                    data_root: str | None = None) -> TaskLike:
    """Only the test split (``bptvlm eval``): an ImageFolder's test images, a benchmark's or a built-in task's."""
    if folder is not True and is_dataset(spec):
        from bptvlm.client.datasets import open_dataset

        return open_dataset(spec, data_root).few_shot(1, seed=0, val_shots=0, image_size=image_size)
    if not (folder if folder is not None else is_folder(spec)):
        return load_data(spec, seed=0, shots=1, val_shots=0, image_size=image_size, folder=False)
    dataset = ImageFolderDataset(spec, image_size, seed=0, test_fraction=test_fraction)
    test_images, test_labels = dataset.load("test")
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    return FewShotData(list(dataset.class_names), empty, np.zeros(0, np.int64), test_images, test_labels)
