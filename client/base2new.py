"""Base-to-new generalisation (CoCoOp's protocol, also ZIP's and SharpZO's).

The classes sorted by label split in two: the first ``ceil(C / 2)`` are the base classes, the rest the
new ones (CoOp's ``subsample_classes``). A run tunes and selects on the base classes only; the chosen
prompt is then tested on the base classes' test images and on the new classes' (which the run never
saw), each split relabelled from 0. ``harmonic_mean = 2 * base * new / (base + new)``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from .api import ClipClient
from .artifacts import SUMMARY_FILE, write_json
from .config import Template, TuneConfig
from .data import FewShotData, TaskLike
from .objective import RemoteTask

logger = logging.getLogger(__name__)


def harmonic_mean(base: float, new: float) -> float:
    """2 b n / (b + n); 0 when both are 0."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


def _subset(images: np.ndarray | None, labels: np.ndarray | None, keep: range) -> tuple[np.ndarray | None, np.ndarray | None]:
    if images is None or labels is None:
        return None, None
    mask = (labels >= keep.start) & (labels < keep.stop)
    return images[mask], (labels[mask] - keep.start).astype(np.int64)


def split_base_new(data: TaskLike) -> tuple[FewShotData, FewShotData]:
    """(base, new): base keeps train/val/test of labels ``< ceil(C/2)``; new keeps only the test images of
    the other labels (no training images: the run never sees them). Labels of each start at 0."""
    names = list(data.class_names)
    if len(names) < 4:
        raise ValueError(f"base2new needs at least 4 classes (2 base + 2 new), the data has {len(names)}: {names}")
    m = math.ceil(len(names) / 2)
    base, new = range(0, m), range(m, len(names))
    template = getattr(data, "template", None)
    tx, ty = _subset(data.train_images, data.train_labels, base)
    vx, vy = _subset(data.val_images, data.val_labels, base)
    bx, by = _subset(data.test_images, data.test_labels, base)
    nx, ny = _subset(data.test_images, data.test_labels, new)
    assert tx is not None and ty is not None and bx is not None and by is not None and nx is not None and ny is not None
    empty = np.zeros((0, *data.test_images.shape[1:]), np.uint8)
    base_data = FewShotData(names[:m], tx, ty, bx, by, vx, vy, template)
    new_data = FewShotData(names[m:], empty, np.zeros(0, np.int64), nx, ny, template=template)
    return base_data, new_data


def new_class_scores(client: ClipClient, new: TaskLike, config: TuneConfig, template: Template,
                     prompts: dict[str, np.ndarray]) -> tuple[float, float, int]:
    """(tuned, zero-shot) test accuracy on the new classes and the evaluation queries it took; no
    prompts (the untuned template was chosen): tuned is zero-shot."""
    task = RemoteTask(client, new, template, config)
    zero = float(task.accuracies("test", {})[0])
    tuned = float(task.accuracies("test", prompts)[0]) if prompts else zero
    return tuned, zero, task.meter.eval


def add_new_classes(summary: dict[str, Any], client: ClipClient, new: TaskLike, config: TuneConfig,
                    template: Template, prompts: dict[str, np.ndarray], out: str | Path | None) -> dict[str, Any]:
    """The base-to-new fields added to a finished run's summary (and summary.json rewritten)."""
    if summary.get("test_accuracy") is None:  # quota ran out before testing: nothing to compare
        return summary
    tuned, zero, queries = new_class_scores(client, new, config, template, prompts)
    base, base_zero = float(summary["test_accuracy"]), float(summary["zero_shot_accuracy"])
    summary.update({
        "protocol": "base2new", "base_classes": summary["class_names"], "new_classes": list(new.class_names),
        "base_accuracy": base, "new_accuracy": tuned, "harmonic_mean": harmonic_mean(base, tuned),
        "base_zero_shot_accuracy": base_zero, "new_zero_shot_accuracy": zero,
        "zero_shot_harmonic_mean": harmonic_mean(base_zero, zero), "num_test_new": len(new.test_labels),
        "eval_queries": int(summary["eval_queries"]) + queries,
    })  # fmt: skip
    if out is not None:
        write_json(Path(out) / SUMMARY_FILE, summary)
    logger.info("base2new: base %.4f, new %.4f, harmonic mean %.4f (zero-shot %.4f, %.4f, %.4f)", base, tuned,
                summary["harmonic_mean"], base_zero, zero, summary["zero_shot_harmonic_mean"])
    return summary
