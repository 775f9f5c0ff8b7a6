"""Run one benchmark cell through the API and return its rows (one per checkpoint budget).

A black-box cell is one tuning run up to the grid's largest budget, with the same candidates as a plain
run of that budget: whole generations are asked and told (only the last one is truncated); a checkpoint
budget inside a generation splits that generation's evaluation into two requests, so the training
queries land on each mark exactly. At each mark (before the generation in flight is told), the best candidate seen (lowest
training loss), the optimizer's recommendation and the untuned template are scored on the validation
split and one is selected by the tuner's rule (`choose_on_validation`: validation accuracy, ties by
loss); only it is scored on test. Validation and test requests are evaluation queries, metered apart
from the training queries. Context lengths are the tuner's too (grid value 0: the client's default).

Units, side by side: ``queries`` = training candidates evaluated (the paper's unit), ``requests`` and
``image_forwards`` as the server reported them for those queries, ``wall_s`` = training wall time
(evaluation excluded, in ``eval_wall_s``), ``price`` = image forwards x price per 1k / 1000.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bptvlm.client.api import ClipClient, add_usage
from bptvlm.client.data import TaskLike
from bptvlm.client.projection import PromptProjection
from bptvlm.client.tuner import (DEFAULT_TEMPLATE, RemoteTask, Template, accuracy, build_projection, choose_on_validation,
                                 make_optimizer)
from bptvlm.shared.protocol import LOGITS, LOSS, PromptLimits, Usage

from .grid import Cell, Grid

logger = logging.getLogger(__name__)


@dataclass
class Meter:
    """Server-reported usage and wall time, training and evaluation apart."""

    train: Usage = field(default_factory=Usage)
    eval: Usage = field(default_factory=Usage)
    train_s: float = 0.0
    eval_s: float = 0.0

    def query(self, task: RemoteTask, split: str, prompts: dict[str, np.ndarray], outputs: tuple[str, ...], purpose: str) -> Any:
        """``task.query`` with its usage and time booked under ``purpose`` ("train" or "eval")."""
        start = time.perf_counter()
        result = task.query(split, prompts, outputs=outputs, purpose=purpose)
        elapsed = time.perf_counter() - start
        if purpose == "train":
            self.train, self.train_s = add_usage(self.train, result.usage), self.train_s + elapsed
        else:
            self.eval, self.eval_s = add_usage(self.eval, result.usage), self.eval_s + elapsed
        return result

    def row(self, price_per_1k: float) -> dict[str, Any]:
        return {
            "queries": self.train.candidates,
            "requests": self.train.requests,
            "image_forwards": self.train.image_forwards,
            "price": round(self.train.image_forwards * price_per_1k / 1000.0, 6),
            "eval_queries": self.eval.candidates,
            "eval_requests": self.eval.requests,
            "eval_image_forwards": self.eval.image_forwards,
        }


def _finite(losses: np.ndarray) -> np.ndarray:
    """Non-finite losses become a large finite value the optimizer can rank."""
    losses = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
        worst = np.max(losses[~bad], initial=0.0)
        losses = np.where(bad, max(1e6, 10 * abs(worst)), losses)
    return losses


def task_template(grid: Grid, data: TaskLike) -> Template:
    return Template(grid.template or getattr(data, "template", None) or DEFAULT_TEMPLATE)


def run_blackbox(
    client: ClipClient, limits: PromptLimits, data: TaskLike, cell: Cell, grid: Grid, bar: Any = None
) -> list[dict[str, Any]]:
    """One tuning run to the largest budget; a row per checkpoint budget. ``bar``: a tqdm over queries."""
    config = cell.tune_config(grid)
    template = task_template(grid, data)
    projection = build_projection(client, limits, config, template, len(data.class_names))
    task = RemoteTask(client, data, template, config)
    opt = make_optimizer(config, projection.dimension)
    meter = Meter()
    best_loss, best_z = float("inf"), np.zeros(projection.dimension, np.float32)
    rows: list[dict[str, Any]] = []
    marks = list(grid.budgets)
    while task.count.train < grid.max_budget:
        # A whole generation is asked and told together (CMA's step-size adaptation needs that); a mark
        # inside it splits only its evaluation into two requests.
        n = min(config.popsize, grid.max_budget - task.count.train)
        candidates = [opt.ask() for _ in range(n)]
        z = np.stack([c.value for c in candidates]).astype(np.float32)  # [n, d]
        losses = np.empty(n)
        done = 0
        while done < n:
            upto = min(n, marks[0] - task.count.train + done) if marks else n
            part = _finite(meter.query(task, "train", projection(z[done:upto]), (LOSS,), "train").loss)
            losses[done:upto] = part
            i = int(np.argmin(part))
            if part[i] < best_loss:
                best_loss, best_z = float(part[i]), z[done + i].copy()
            if bar is not None:
                bar.update(upto - done)
            done = upto
            if marks and task.count.train == marks[0]:
                row = {"budget": marks.pop(0), "train_loss": best_loss, **_select(task, projection, best_z, opt, meter)}
                rows.append({**row, **meter.row(grid.price_per_1k_image_forwards), "wall_s": round(meter.train_s, 3),
                             "eval_wall_s": round(meter.eval_s, 3)})  # fmt: skip
        for candidate, loss in zip(candidates, losses):
            opt.tell(candidate, float(loss))
    if task.count.train != grid.max_budget:
        raise RuntimeError(f"cell {cell} spent {task.count.train} training queries, budget {grid.max_budget}")
    return rows


def _select(task: RemoteTask, projection: PromptProjection, best_z: np.ndarray, opt: Any, meter: Meter) -> dict[str, Any]:
    """Choose among the best candidate seen, the recommendation and the template (the tuner's rule); test it."""
    rec_z = np.asarray(opt.provide_recommendation().value, dtype=np.float32)
    names, zs = ["best"], [best_z]
    if not np.array_equal(rec_z, best_z):
        names.append("recommendation")
        zs.append(rec_z)
    prompts = projection(np.stack(zs))  # population of 1 or 2
    val = meter.query(task, "val", prompts, (LOSS, LOGITS), "eval")
    plain = meter.query(task, "val", {}, (LOSS, LOGITS), "eval")  # the untuned template: no prompt at all
    names.append("template")
    loss, logits = np.concatenate([val.loss, plain.loss]), np.concatenate([val.logits, plain.logits])
    pick, scores = choose_on_validation(loss, logits, task.labels("val"), names)
    chosen = {} if names[pick] == "template" else {k: v[pick : pick + 1] for k, v in prompts.items()}
    test = meter.query(task, "test", chosen, (LOGITS,), "eval")
    return {
        "selected": names[pick],
        "val_loss": scores[f"val_loss_{names[pick]}"],
        "val_accuracy": scores[f"val_accuracy_{names[pick]}"],
        "test_accuracy": float(accuracy(test.logits, task.labels("test"))[0]),
    }


def run_api_baseline(client: ClipClient, data: TaskLike, cell: Cell, grid: Grid) -> list[dict[str, Any]]:
    """Zero-shot (the task's template) or the template ensemble (logits averaged over templates),
    through the API: no training queries; every request is an evaluation query."""
    config = cell.tune_config(grid)
    templates = [task_template(grid, data).text]
    if cell.method == "ensemble":
        templates += [t for t in grid.ensemble_templates if t not in templates]
    meter = Meter()
    logits: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    for text in templates:
        task = RemoteTask(client, data, Template(text), config)
        for split in logits:
            logits[split].append(meter.query(task, split, {}, (LOGITS,), "eval").logits[0])  # [N, C]
    acc = {s: float(accuracy(np.mean(v, axis=0)[None], task.labels(s))[0]) for s, v in logits.items()}
    row = {"budget": 0, "val_accuracy": acc["val"], "test_accuracy": acc["test"], "selected": f"{len(templates)} templates",
           **meter.row(grid.price_per_1k_image_forwards), "wall_s": 0.0, "eval_wall_s": round(meter.eval_s, 3)}
    return [row]
