"""Run one benchmark cell through the API and return its rows (one per checkpoint budget).

A black-box cell is one run of the tuning loop (``client/loop.py``, the one ``bptvlm tune`` runs) up
to the grid's largest budget, with the grid's budgets as the loop's marks: a mark inside a generation
splits that generation's scoring into two requests, so the training queries land on each mark
exactly. At each mark the prompt is chosen by the tuner's rule (``client/selection.py``: best seen,
recommendation or the untuned template, by validation accuracy, ties by loss); only it is tested. Validation and test requests are evaluation queries, metered apart
from the training queries. Context lengths are the tuner's too (grid value 0: the client's default).

Units, side by side: ``queries`` = training candidates evaluated (the paper's unit), ``requests`` and
``image_forwards`` as the server reported them for those queries, ``wall_s`` = training wall time
(evaluation excluded, in ``eval_wall_s``), ``price`` = image forwards x price per 1k / 1000.

Under ``protocol = "base2new"`` the data is the base classes and ``new`` the new classes' test split:
each row also gets ``base_accuracy`` (= ``test_accuracy``), ``new_accuracy`` and ``harmonic_mean``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from bptvlm.client.api import ClipClient
from bptvlm.client.config import Template, task_template
from bptvlm.client.data import TaskLike
from bptvlm.client.feedback import access_of, resolve_feedback
from bptvlm.client.loop import LoopCallback, SearchState, run_search
from bptvlm.client.objective import Meter, RemoteTask, accuracy
from bptvlm.client.projection import PromptProjection, build_projection
from bptvlm.client.selection import select_prompt
from bptvlm.client.strategies import Strategy, StrategySpec, make_strategy
from bptvlm.shared.protocol import LOGITS, PromptLimits

from .grid import Cell, Grid

logger = logging.getLogger(__name__)


def meter_row(meter: Meter, price_per_1k: float) -> dict[str, Any]:
    """A result row's cost columns from a task's meter."""
    train, ev = meter.usage["train"], meter.usage["eval"]
    return {
        "queries": train.candidates,
        "requests": train.requests,
        "image_forwards": train.image_forwards,
        "price": round(train.image_forwards * price_per_1k / 1000.0, 6),
        "eval_queries": ev.candidates,
        "eval_requests": ev.requests,
        "eval_image_forwards": ev.image_forwards,
        "wall_s": round(meter.seconds["train"], 3),
        "eval_wall_s": round(meter.seconds["eval"], 3),
    }


def new_class_row(new: RemoteTask | None, base_accuracy: float, prompts: dict[str, np.ndarray]) -> dict[str, Any]:
    """base2new columns of a row (none without new classes); the new classes' queries are booked on ``new``."""
    if new is None:
        return {}
    from bptvlm.client.base2new import harmonic_mean

    acc = float(new.accuracies("test", prompts)[0])
    return {"base_accuracy": base_accuracy, "new_accuracy": acc, "harmonic_mean": harmonic_mean(base_accuracy, acc)}


class _Marks(LoopCallback):
    """At each budget mark: select on validation, test the choice, record a row."""

    def __init__(self, task: RemoteTask, projection: PromptProjection, strategy: Strategy, grid: Grid, bar: Any,
                 new: RemoteTask | None = None) -> None:
        self.task, self.projection, self.strategy, self.grid, self.bar = task, projection, strategy, grid, bar
        self.new = new
        self.rows: list[dict[str, Any]] = []

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(state.spent - self.bar.n)

    def on_mark(self, budget: int, state: SearchState) -> None:
        assert state.best_z is not None
        chosen = select_prompt(self.task, self.projection, state.best_z, state.best_loss, self.strategy.recommend())
        prompts = self.projection(chosen.z[None, :]) if chosen.z is not None else {}
        extra = new_class_row(self.new, chosen.test_accuracy, prompts)
        self.rows.append({**extra, "budget": budget, "train_loss": state.best_loss, "selected": chosen.selected,
                          "val_loss": chosen.scores[f"val_loss_{chosen.selected}"],
                          "val_accuracy": chosen.scores[f"val_accuracy_{chosen.selected}"],
                          "test_accuracy": chosen.test_accuracy,
                          **meter_row(self.task.meter, self.grid.price_per_1k_image_forwards)})  # fmt: skip


def run_blackbox(
    client: ClipClient, limits: PromptLimits, data: TaskLike, cell: Cell, grid: Grid, bar: Any = None,
    new: TaskLike | None = None,
) -> list[dict[str, Any]]:
    """One tuning run to the task's largest budget; a row per checkpoint budget. ``bar``: a tqdm over
    queries; ``new``: base2new's new classes (test only)."""
    config = cell.tune_config(grid)
    template = task_template(config, data)
    projection = build_projection(client, limits, config, template, len(data.class_names))
    access = access_of(client.model_metadata())  # the key's output policy: the feedback it allows
    config = replace(config, feedback=resolve_feedback(config.feedback, access))
    task = RemoteTask(client, data, template, config, access=access)
    new_task = None
    if new is not None:
        new_task = RemoteTask(client, new, template, config, access=access)
        new_task.meter = task.meter  # its queries are evaluation queries of the cell
    strategy = make_strategy(StrategySpec.of(config, projection))
    marks = _Marks(task, projection, strategy, grid, bar, new_task)
    budgets = grid.budgets_for(cell.task)

    def score(z: np.ndarray, tag: str) -> np.ndarray:
        return task.losses("train", projection(z), purpose="train")

    state = run_search(score, strategy, budget=config.budget, popsize=config.popsize, callbacks=[marks], marks=budgets)
    if state.spent != budgets[-1] or len(marks.rows) != len(budgets):
        raise RuntimeError(f"cell {cell} spent {state.spent} training queries, budget {budgets[-1]}")
    return marks.rows


def run_api_baseline(client: ClipClient, data: TaskLike, cell: Cell, grid: Grid, new: TaskLike | None = None) -> list[dict[str, Any]]:
    """Zero-shot (the task's template) or the template ensemble (logits averaged over templates),
    through the API: no training queries; every request is an evaluation query. ``new``: base2new's
    new classes, scored the same way."""
    config = cell.tune_config(grid)
    templates = [task_template(config, data).text]
    if cell.method == "ensemble":
        templates += [t for t in grid.ensemble_templates if t not in templates]
    meter = Meter()
    logits: dict[str, list[np.ndarray]] = {"val": [], "test": [], "new": []}
    for text in templates:
        task = RemoteTask(client, data, Template(text), config)
        task.meter = meter
        for split in ("val", "test"):
            logits[split].append(task.query(split, {}, outputs=(LOGITS,), purpose="eval").logits[0])  # [N, C]
        if new is not None:
            new_task = RemoteTask(client, new, Template(text), config)
            new_task.meter = meter
            logits["new"].append(new_task.query("test", {}, outputs=(LOGITS,), purpose="eval").logits[0])
    acc = {s: float(accuracy(np.mean(logits[s], axis=0)[None], task.labels(s))[0]) for s in ("val", "test")}
    extra: dict[str, Any] = {}
    if new is not None:
        from bptvlm.client.base2new import harmonic_mean

        new_acc = float(accuracy(np.mean(logits["new"], axis=0)[None], np.asarray(new.test_labels))[0])
        extra = {"base_accuracy": acc["test"], "new_accuracy": new_acc, "harmonic_mean": harmonic_mean(acc["test"], new_acc)}
    row = {"budget": 0, **extra, "val_accuracy": acc["val"], "test_accuracy": acc["test"], "selected": f"{len(templates)} templates",
           **meter_row(meter, grid.price_per_1k_image_forwards), "wall_s": 0.0}
    return [row]
