"""Choosing the prompt to ship: the best candidate seen, the optimizer's recommendation or the untuned
template, on the validation split (one rule for ``tune``, ``bench`` and the Python API).

Accuracy decides because it is what is reported: on an over-confident model the search can cut the
cross-entropy by flattening the logits while accuracy falls (BENCHMARKS.md, "Selection"). With a few
validation images a class, accuracies tie often; the loss breaks ties. Keeping the template in the
running means a search that only fitted the training shots falls back to exactly zero-shot.
Without a validation split, best vs recommendation by training loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .objective import RemoteTask
from .projection import PromptProjection


def choose_on_validation(loss: np.ndarray, acc: np.ndarray | None, names: list[str]) -> tuple[int, dict[str, Any]]:
    """Index of the highest validation accuracy, ties by the lower loss, given one population's
    ``loss`` [P] and accuracy ``acc`` [P] (None: a policy without labels; by loss alone) named ``names``;
    plus ``val_accuracy_<name>``/``val_loss_<name>``."""
    pick = min(range(len(names)), key=lambda i: (0.0 if acc is None else -float(acc[i]), float(loss[i])))
    scores: dict[str, Any] = {f"val_accuracy_{n}": None if acc is None else float(a)
                              for n, a in zip(names, acc if acc is not None else [None] * len(names))}
    scores.update({f"val_loss_{n}": float(v) for n, v in zip(names, loss)})
    return pick, scores


def _first(acc: np.ndarray | None) -> float | None:
    return None if acc is None else float(acc[0])


@dataclass
class Selection:
    """What was chosen and how it scored. ``z`` is None when the untuned template won."""

    selected: str
    selected_by: str
    z: np.ndarray | None
    test_accuracy: float | None  # None: the key's output policy returns no labels (loss only)
    scores: dict[str, Any] = field(default_factory=dict)  # val_* and (report_all) test_accuracy_* of each


def select_prompt(
    task: RemoteTask,
    projection: PromptProjection,
    best_z: np.ndarray,
    best_loss: float,
    rec_z: np.ndarray,
    *,
    at: str | None = None,
    report_all: bool = False,
) -> Selection:
    """Choose among best seen, recommendation and template; test the choice (``report_all``: test each,
    and score the recommendation's training loss). ``at`` prefixes the request-id tags, so the same
    state asks the same questions (a resumed run is not charged twice)."""
    tag = (lambda s: f"{at}-{s}") if at else (lambda s: None)
    candidates = {"best": best_z}
    if not np.array_equal(rec_z, best_z):
        candidates["recommendation"] = rec_z
    names = list(candidates)
    prompts = projection(np.stack(list(candidates.values())))
    scores: dict[str, Any] = {}
    train_losses = [best_loss]
    if "recommendation" in candidates and (report_all or "val" not in task.splits):
        train_losses.append(float(task.losses("train", projection(rec_z[None, :]), tag=tag("rec-train"))[0]))
    if report_all:
        scores["recommendation_train_loss"] = train_losses[-1]
    if "val" in task.splits:
        val_acc, val_loss = task.assess("val", prompts, tag=tag("val"))
        plain_acc, plain_loss = task.assess("val", {}, tag=tag("val-template"))
        acc = None if val_acc is None or plain_acc is None else np.concatenate([val_acc, plain_acc])
        names.append("template")
        pick, val_scores = choose_on_validation(np.concatenate([val_loss, plain_loss]), acc, names)
        scores.update(val_scores)
        selected, selected_by = names[pick], "val_accuracy" if acc is not None else "val_loss"
    else:
        selected, selected_by = names[int(np.argmin(train_losses))], "train_loss"
        names.append("template")
    if report_all:
        tested = task.accuracies("test", prompts, tag=tag("test"))
        acc = dict(zip(candidates, [None] * len(candidates) if tested is None else tested.astype(float).tolist()))
        acc["template"] = _first(task.accuracies("test", {}, tag=tag("zero-shot")))
        acc.setdefault("recommendation", acc["best"])
        scores.update({f"test_accuracy_{name}": value for name, value in acc.items()})
        test_accuracy = acc[selected]
    else:
        chosen = {} if selected == "template" else {k: v[names.index(selected) : names.index(selected) + 1]
                                                    for k, v in prompts.items()}
        test_accuracy = _first(task.accuracies("test", chosen, tag=tag("test")))
    return Selection(selected, selected_by, candidates.get(selected), test_accuracy, scores)
