"""What a run records besides its progress log, as callbacks on the one loop (``loop.run_search``):

- ``ValidationCurve``: every ``eval_every`` training queries, the validation accuracy of the
  best-so-far prompt goes into that generation's progress record (``val_accuracy``, ``val_loss``,
  ``eval_queries``); its queries are evaluation queries, counted apart from the budget;
- ``TensorBoardLog``: the same records as TensorBoard event files (through ``tensorboardX``, the
  optional extra ``bptvlm[tracking]``), the config as hparams with the final accuracies;
- ``plot_curves``: training loss and validation accuracy against training queries, one line per run,
  as a PNG (``curves.png`` in a run folder; ``bptvlm compare`` overlays several runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loop import LoopCallback, SearchState
from .objective import RemoteTask
from .projection import PromptProjection

logger = logging.getLogger(__name__)
CURVES_FILE = "curves.png"


def eval_every_of(eval_every: int | None, budget: int) -> int:
    """The validation-curve interval in training queries: ``eval_every``, else a tenth of the budget; 0: off."""
    if eval_every is None:
        return max(1, budget // 10)
    return max(0, eval_every)


def planned_curve_evals(every: int, budget: int, popsize: int, spent: int = 0) -> int:
    """At most how many validation-curve requests (one candidate each) a run from ``spent`` to ``budget``
    makes: one per interval crossed, at most one per generation."""
    generations = -(-(budget - spent) // popsize)
    return 0 if every <= 0 else max(0, min(budget // every - spent // every, generations))


class ValidationCurve(LoopCallback):
    """Validation accuracy of the best-so-far prompt every ``every`` training queries (one candidate per
    point; none when the best did not change since the last point). Place it before the callback that
    writes the progress record: it adds ``val_accuracy``/``val_loss``/``eval_queries`` to the record."""

    def __init__(self, task: RemoteTask, projection: PromptProjection, every: int, spent: int = 0) -> None:
        self.task, self.projection, self.every = task, projection, every
        self._mark = spent // every if every > 0 else 0
        self._last: tuple[int, float | None, float] | None = None  # best_generation, accuracy, loss

    @property
    def active(self) -> bool:
        return self.every > 0 and "val" in self.task.splits

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        if not self.active or state.best_z is None or state.spent // self.every <= self._mark:
            return
        self._mark = state.spent // self.every
        if self._last is None or self._last[0] != state.best_generation:
            acc, loss = self.task.assess("val", self.projection(state.best_z[None, :]),
                                         tag=f"g{record['generation']}-curve")  # fmt: skip
            self._last = (state.best_generation, None if acc is None else float(acc[0]), float(loss[0]))
        record.update(val_accuracy=self._last[1], val_loss=self._last[2], eval_queries=self.task.meter.eval)


class TensorBoardLog(LoopCallback):
    """TensorBoard event files in ``logdir``: scalars per generation (step = training queries) and,
    at ``finish``, the config as hparams with the final accuracies. Needs ``tensorboardX``."""

    def __init__(self, logdir: str | Path, config: dict[str, Any]) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the optional extra: pip install 'bptvlm[tracking]' "
                             "(tensorboardX)") from None  # fmt: skip
        self.writer = SummaryWriter(logdir=str(logdir))
        self.config = config

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        step = int(record["queries"])
        for key in ("best_loss", "mean_loss", "min_loss", "val_accuracy", "val_loss", "eval_queries"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"tune/{key}", float(record[key]), global_step=step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.items()}
            metrics = {f"hparam/{k}": float(summary[k]) for k in ("test_accuracy", "zero_shot_accuracy", "best_train_loss")
                       if isinstance(summary.get(k), (int, float))}  # fmt: skip
            self.writer.add_hparams(hparams, metrics, name="hparams")
        self.writer.close()


@dataclass
class Curve:
    """One run's curves: ``queries`` [G] with ``best_loss`` [G] and validation points (queries, accuracy)."""

    label: str
    queries: list[int]
    best_loss: list[float]
    val: list[tuple[int, float]] = field(default_factory=list)
    zero_shot_val: float | None = None

    @classmethod
    def from_records(cls, label: str, records: Sequence[dict[str, Any]], zero_shot_val: float | None = None) -> Curve:
        val = [(int(r["queries"]), float(r["val_accuracy"])) for r in records if r.get("val_accuracy") is not None]
        return cls(label, [int(r["queries"]) for r in records], [float(r["best_loss"]) for r in records], val, zero_shot_val)


def plot_curves(curves: Sequence[Curve], path: Path, title: str = "") -> Path:
    """PNG at ``path``: best training loss (left) and validation accuracy of the best-so-far prompt
    (right) against training queries, one colour per run, both x axes from 0 queries; a run's untuned
    template on the validation split is its dashed line. The legend sits below the axes (never clipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .artifacts import write_atomic

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        ax_loss.plot(c.queries, c.best_loss, color=colour, label=c.label)
        if c.val:
            q, a = zip(*c.val)
            ax_acc.plot(q, a, marker="o", markersize=3, color=colour)
        if c.zero_shot_val is not None:
            ax_acc.axhline(c.zero_shot_val, color=colour, linestyle="--", linewidth=1)
    ax_loss.set(xlabel="training queries (candidates evaluated)", ylabel="best training loss so far", title="training loss")
    ax_acc.set(xlabel="training queries (candidates evaluated)", ylabel="validation accuracy",
               title="validation accuracy of the best-so-far prompt\n(dashed: the untuned template)", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(curves))), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(curves) - 1) // 4), 1, 1))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def run_curve(records: Sequence[dict[str, Any]], summary: dict[str, Any] | None, label: str) -> Curve:
    """A run's ``Curve`` from its progress records and summary (for the dashed template line)."""
    zero = summary.get("val_accuracy_template") if summary else None
    return Curve.from_records(label, records, float(zero) if isinstance(zero, (int, float)) else None)

