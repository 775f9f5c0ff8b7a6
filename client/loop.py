"""The one tuning loop: ask a generation, score it remotely, tell it whole, until the budget is spent.

    z [n, d] = strategy.ask(n)  ->  score(z, tag) -> losses [n]  ->  strategy.tell(z, losses)

Training queries stop exactly at ``budget`` (the last generation is asked short). Side jobs attach as
callbacks, so ``tune``, ``bench``, ``demo`` and the Python API all run this loop:

- ``on_generation(state, record)`` after every tell (progress log, checkpoint, progress bar);
- ``on_mark(budget, state)`` when the training queries reach a budget mark (bench's read-outs). A mark
  inside a generation splits only that generation's scoring into two requests and fires before the
  generation is told (what is known at that budget); a mark at a generation's end fires after its tell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .objective import finite_losses
from .strategies import Strategy

logger = logging.getLogger(__name__)

Score = Callable[[np.ndarray, str], np.ndarray]
"""``score(z [n, d], tag) -> losses [n]``: one request; ``tag`` names it (request ids)."""


@dataclass
class SearchState:
    """Where a search stands between generations (checkpointed)."""

    spent: int = 0  # training queries evaluated
    generations: int = 0  # generations told
    best_loss: float = float("inf")
    best_z: np.ndarray | None = None  # float32 [d]
    best_generation: int = -1


class Callback(Protocol):
    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None: ...

    def on_mark(self, budget: int, state: SearchState) -> None: ...


class LoopCallback:
    """A callback with both hooks doing nothing: subclass and override what you need."""

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        pass

    def on_mark(self, budget: int, state: SearchState) -> None:
        pass


def _score_parts(score: Score, z: np.ndarray, state: SearchState, marks: list[int], callbacks: Sequence[Callback]) -> np.ndarray:
    """Score a generation, in two or more requests where a mark falls inside it; update the best seen."""
    n, done, losses = len(z), 0, np.empty(len(z))
    while done < n:
        upto = min(n, marks[0] - state.spent + done) if marks and marks[0] - state.spent < n - done else n
        tag = f"g{state.generations}" if done == 0 else f"g{state.generations}-{done}"
        part = finite_losses(score(z[done:upto], tag))
        if part.shape != (upto - done,):
            raise ValueError(f"the objective returned {part.shape} losses for {upto - done} candidates")
        losses[done:upto] = part
        state.spent += upto - done
        i = int(np.argmin(part))
        if part[i] < state.best_loss:
            state.best_loss, state.best_z, state.best_generation = float(part[i]), z[done + i].copy(), state.generations
        done = upto
        if done < n and marks and state.spent == marks[0]:  # inside the generation: before its tell
            for cb in callbacks:
                cb.on_mark(marks.pop(0), state)
    return losses


def run_search(
    score: Score,
    strategy: Strategy,
    *,
    budget: int,
    popsize: int,
    state: SearchState | None = None,
    callbacks: Sequence[Callback] = (),
    marks: Sequence[int] = (),
) -> SearchState:
    """Run generations from ``state`` until ``budget`` training queries are spent; return the state.

    ``marks``: budgets (<= ``budget``) at which ``on_mark`` fires; those already passed are skipped.
    """
    state = state or SearchState()
    pending = sorted(m for m in set(marks) if state.spent < m <= budget)
    while state.spent < budget:
        n = min(popsize, budget - state.spent)
        z = strategy.ask(n)
        losses = _score_parts(score, z, state, pending, callbacks)
        strategy.tell(z, losses)
        record = {
            "generation": state.generations,
            "queries": state.spent,
            "best_loss": state.best_loss,
            "mean_loss": float(losses.mean()),
            "min_loss": float(losses.min()),
        }
        state.generations += 1
        for cb in callbacks:
            cb.on_generation(state, record)
        if pending and state.spent == pending[0]:  # at the generation's end: after its tell
            for cb in callbacks:
                cb.on_mark(pending.pop(0), state)
        logger.debug("generation %(generation)d: %(queries)d queries, best %(best_loss).4f", record)
    return state
