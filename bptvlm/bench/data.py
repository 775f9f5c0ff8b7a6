"""Few-shot data of a benchmark task: a built-in task of the embedded world, or an ImageFolder.

Every method of a cell sees the same images: ``shots`` training images per class, ``val_shots``
validation images per class drawn from the training pool (disjoint from the shots and from test; the
checkpoint prompts, CoOp's step and the probe's regularisation are chosen on it), and a test split
that is scored only, never used to choose anything.
"""

from __future__ import annotations

from pathlib import Path

from bptvlm.client.data import FewShotData, ImageFolderDataset, TaskLike


def is_folder(spec: str) -> bool:
    """A task spec naming a directory (``./data/pets``) rather than a built-in task (``shape``)."""
    return "/" in spec or Path(spec).is_dir()


def load_data(spec: str, *, seed: int, shots: int, val_shots: int, test_per_class: int, image_size: int) -> TaskLike:
    """Train/val/test splits of ``spec`` for ``seed`` (the test split does not depend on the seed)."""
    if is_folder(spec):
        dataset = ImageFolderDataset(spec, image_size, seed=0)
        data: FewShotData = dataset.few_shot(shots, seed=seed, n_val=val_shots)
        return data
    from bptvlm.world.tasks import load_task

    return load_task(spec, shots=shots, seed=seed, n_val=val_shots, n_test=test_per_class)


def template_of(data: TaskLike) -> str | None:
    """The task's own zero-shot template, if it has one."""
    return getattr(data, "template", None)
