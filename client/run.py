"""A tuning run: set up once from the server's metadata, search (``loop.run_search``), select, test.

``run_tuning`` starts one, ``resume_tuning`` continues a checkpointed one to the result an
uninterrupted run gets. With an output folder the run writes summary.json, progress.jsonl,
prompts.safetensors and (every generation) checkpoint.pkl; without one (the Python API) nothing.

Training queries stop exactly at the budget; every other query (initial loss, validation, the
recommendation's loss, zero-shot and tuned test accuracy) is an evaluation query, counted apart.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bptvlm.shared.errors import BudgetExhaustedError
from bptvlm.shared.protocol import PROTOCOL_VERSION, ModelMetadata, Usage

from .api import ClipClient
from .artifacts import PROGRESS_FILE, PROMPTS_FILE, SUMMARY_FILE, ProgressLog, SavedPrompts, save_prompts, write_json
from .checkpoint import CHECKPOINT_FILE, Checkpoint, data_fingerprint, load_checkpoint, save_checkpoint
from .config import CONFIG_FIELDS, Template, TuneConfig, task_template
from .data import TaskLike
from .loop import LoopCallback, SearchState, run_search
from .objective import RemoteTask
from .projection import PromptProjection, build_projection
from .selection import select_prompt
from .strategies import Strategy, StrategySpec, make_strategy

logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What a run produced: ``summary`` (as in summary.json), ``prompts`` (name -> ndarray, a
    population of one; empty when the untuned template won) and ``history`` (one record a generation)."""

    summary: dict[str, Any]
    prompts: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Setup:
    """What a run derives from the server's metadata, the data and the config (fresh or resumed)."""

    metadata: ModelMetadata
    model_id: str
    template: Template
    projection: PromptProjection
    task: RemoteTask
    fingerprint: str

    @property
    def config(self) -> TuneConfig:
        return self.task.config


def model_id_of(metadata: ModelMetadata) -> str:
    return str(metadata.parameters.get("model_id", metadata.name))


def _setup(client: ClipClient, data: TaskLike, config: TuneConfig, metadata: ModelMetadata | None = None) -> _Setup:
    metadata = metadata or client.model_metadata()
    limits = client.prompt_limits(metadata)
    template = task_template(config, data)
    projection = build_projection(client, limits, config, template, len(data.class_names))
    # the lengths the defaults resolved to are part of the run (checkpoint, summary): a resume reuses them
    config = replace(config, n_ctx_text=projection.n_ctx_text, n_ctx_vision=projection.n_ctx_vision)
    task = RemoteTask(client, data, template, config)
    return _Setup(metadata, model_id_of(metadata), template, projection, task, data_fingerprint(task.class_names, task.splits))


class _Checkpointer(LoopCallback):
    """The run's checkpoint in memory and (with a path) on disk, written after every generation.
    ``state`` changes only once the file is written, so an interrupt never leaves a half-updated one."""

    def __init__(self, path: Path | None, state: Checkpoint, task: RemoteTask, strategy: Strategy, log: ProgressLog) -> None:
        self.path, self.state, self.task, self.strategy, self.log = path, state, task, strategy, log
        self._start = time.perf_counter() - state.elapsed_s
        self._usage_base = Usage.model_validate(state.server_usage) if state.server_usage else Usage()
        self._usage_before = task.client.usage
        task.meter.queries.update(train=state.train_queries, eval=state.eval_queries)
        task.run_id = state.run_id

    def elapsed(self) -> float:
        """Wall seconds since the run started, over every process that worked on it."""
        return time.perf_counter() - self._start

    def server_usage(self) -> dict[str, int]:
        """What the server reported for the run's requests, this process's added to earlier ones'."""
        now, before = self.task.client.usage.model_dump(), self._usage_before.model_dump()
        return {k: v + now[k] - before[k] for k, v in self._usage_base.model_dump().items()}

    def commit(self, **changes: Any) -> None:
        new = replace(self.state, **changes, train_queries=self.task.meter.train, eval_queries=self.task.meter.eval,
                      server_usage=self.server_usage(), elapsed_s=self.elapsed())  # fmt: skip
        if self.path is not None:
            save_checkpoint(self.path, new)
        self.state = new

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        self.log.write({**record, "wall_s": round(self.elapsed(), 4)})
        self.commit(generation=state.generations, best_loss=state.best_loss, best_z=state.best_z,
                    best_generation=state.best_generation, progress_lines=len(self.log.records),
                    strategy=pickle.dumps(self.strategy, protocol=pickle.HIGHEST_PROTOCOL))  # fmt: skip


class _Bar(LoopCallback):
    def __init__(self, total: int, initial: int, show: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, unit="query", desc="tuning", disable=not show)

    def on_generation(self, state: SearchState, record: dict[str, Any]) -> None:
        self.bar.update(state.spent - self.bar.n)
        self.bar.set_postfix(best=f"{state.best_loss:.4f}")


def run_tuning(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``start(...)``'s summary: tune prompts for ``data`` through ``client``."""
    return start(*args, **kwargs).summary


def start(
    client: ClipClient,
    data: TaskLike,
    config: TuneConfig,
    out_dir: str | Path | None,
    progress: bool = True,
    *,
    extra: dict[str, Any] | None = None,
    metadata: ModelMetadata | None = None,
) -> TuneResult:
    """Tune prompts for ``data`` through ``client``; ``TuneResult`` with summary, prompts and history.
    ``out_dir`` None: no files. ``extra`` (JSON-like) is kept in the checkpoint for whoever resumes."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    setup = _setup(client, data, config, metadata)
    strategy = make_strategy(StrategySpec(setup.config.optimizer, setup.config.popsize, setup.projection.dimension,
                                          setup.config.budget, setup.config.seed))  # fmt: skip
    state = Checkpoint(config=asdict(setup.config), run_id=uuid.uuid4().hex, model_id=setup.model_id,
                       data_fingerprint=setup.fingerprint, template=setup.template.text, strategy=b"",
                       extra=dict(extra or {}))  # fmt: skip
    return _execute(setup, out, state, strategy, progress)


def resume_tuning(client: ClipClient, data: TaskLike, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Continue the run checkpointed in ``out_dir`` (same config, same total budget) and return its
    summary, which equals an uninterrupted run's but for ``wall_s``. A finished run is not touched:
    its summary comes back without a query. ``CheckpointError`` if the model or data differ."""
    out = Path(out_dir)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    if state.done and state.summary is not None:
        logger.info("the run in %s is finished; nothing to resume", out)
        return state.summary
    setup = _setup(client, data, TuneConfig(**{k: v for k, v in state.config.items() if k in CONFIG_FIELDS}))
    state.check(model_id=setup.model_id, data_fingerprint=setup.fingerprint, template=setup.template.text)
    logger.info("resuming %s at generation %d: %d of %d training queries spent",
                out, state.generation, state.train_queries, setup.config.budget)  # fmt: skip
    strategy = state.load_strategy() if state.strategy else make_strategy(
        StrategySpec(setup.config.optimizer, setup.config.popsize, setup.projection.dimension, setup.config.budget,
                     setup.config.seed))  # fmt: skip
    return _execute(setup, out, state, strategy, progress).summary


def _execute(setup: _Setup, out: Path | None, state: Checkpoint, strategy: Strategy, progress: bool) -> TuneResult:
    """Train from ``state`` to the budget, select, test, write the outputs; checkpoint all along."""
    task, projection, template, config = setup.task, setup.projection, setup.template, setup.config
    log = ProgressLog(out / PROGRESS_FILE if out else None, keep=state.progress_lines)
    run = _Checkpointer(out / CHECKPOINT_FILE if out else None, state, task, strategy, log)
    run.commit()
    logger.info("tuning %s on %s: %d classes, %d train images, budget %d, %s popsize %d, z in R^%d",
                config.variant, setup.model_id, len(task.class_names), len(task.labels("train")),
                config.budget, strategy.describe(), config.popsize, projection.dimension)  # fmt: skip
    zero = np.zeros((1, projection.dimension), dtype=np.float32)
    if run.state.initial_loss is None:
        run.commit(initial_loss=float(task.losses("train", projection(zero), tag="initial")[0]))
    initial_loss = run.state.initial_loss
    assert initial_loss is not None
    meta = {"model": setup.model_id, "model_name": setup.metadata.name, "template": template.text,
            "context_init": template.prefix, "class_names": task.class_names,
            "class_texts": [template.class_text(n) for n in task.class_names], "protocol_version": PROTOCOL_VERSION,
            **{k: v for k, v in asdict(config).items() if k != "template"}, **projection.config()}  # fmt: skip
    s = run.state
    search = SearchState(spent=s.train_queries, generations=s.generation, best_loss=s.best_loss, best_z=s.best_z,
                         best_generation=s.best_generation)  # fmt: skip
    bar = _Bar(config.budget, search.spent, progress and sys.stderr.isatty())
    interrupted = False

    def score(z: np.ndarray, tag: str) -> np.ndarray:
        return task.losses("train", projection(z), purpose="train", tag=tag)

    try:
        run_search(score, strategy, budget=config.budget, popsize=config.popsize, state=search, callbacks=[run, bar])
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted after %d training queries; evaluating what was found", task.meter.train)
    except BudgetExhaustedError:
        logger.error("the server's budget for this key is spent after %d training queries", task.meter.train)
        if search.best_z is not None and out is not None:  # keep what was paid for
            _save(out, projection, search.best_z, {**meta, "selected": "best", "incomplete": True})
            logger.error("best prompt so far (train loss %.4f) saved to %s", search.best_loss, out / PROMPTS_FILE)
        raise
    finally:
        bar.bar.close()
        log.close()
    best_z, best_loss = (search.best_z, search.best_loss) if search.best_z is not None else (zero[0], initial_loss)
    chosen = select_prompt(task, projection, best_z, best_loss, strategy.recommend(), at=f"g{search.generations}",
                           report_all=True)  # fmt: skip
    prompts = projection(chosen.z[None, :]) if chosen.z is not None else {}
    if out is not None:
        _save(out, projection, chosen.z, {**meta, "selected": chosen.selected})
    summary = {
        **asdict(config),
        "config": asdict(config),
        "strategy": strategy.describe(),
        "template": template.text,
        "context_init": template.prefix,
        "d_text": projection.d_text,
        "d_vision": projection.d_vision,
        "model": setup.model_id,
        "model_name": setup.metadata.name,
        "model_versions": setup.metadata.versions,
        "endpoint": task.client.endpoint,
        "class_names": task.class_names,
        "num_train": len(task.labels("train")),
        "num_val": len(task.labels("val")) if "val" in task.splits else 0,
        "num_test": len(task.labels("test")),
        "initial_train_loss": initial_loss,
        "best_train_loss": best_loss,
        "best_generation": search.best_generation,
        "generations": search.generations,
        "interrupted": interrupted,
        **chosen.scores,
        "selected": chosen.selected,
        "selected_by": chosen.selected_by,
        "test_accuracy": chosen.test_accuracy,
        "zero_shot_accuracy": chosen.scores["test_accuracy_template"],
        "train_queries": task.meter.train,
        "eval_queries": task.meter.eval,
        "server_usage": run.server_usage(),
        "wall_s": round(run.elapsed(), 3),
    }
    if out is not None:
        write_json(out / SUMMARY_FILE, summary)
    # an interrupted run keeps its last generation's strategy and can be resumed; its evaluation
    # queries were spent all the same, so the counters move on
    run.commit(done=not interrupted, summary=None if interrupted else summary)
    logger.info("zero-shot %.4f -> tuned %.4f test accuracy; train loss %.4f -> %.4f in %d queries (+%d for evaluation)",
                summary["zero_shot_accuracy"], summary["test_accuracy"], initial_loss, best_loss,
                task.meter.train, task.meter.eval)  # fmt: skip
    return TuneResult(summary=summary, prompts=prompts, history=list(log.records))


def _save(out: Path, projection: PromptProjection, z: np.ndarray | None, meta: dict[str, Any]) -> None:
    """prompts.safetensors for one z [d]: its prompt tensors (population of one) and z itself; for
    ``z = None`` (the untuned template won) no prompt tensors, so applying the file is zero-shot."""
    if z is None:
        save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={"z": np.zeros((1, projection.dimension), np.float32)},
                                                      meta={**meta, "prompt": "none: the untuned template"}))
        return
    tensors = projection(z[None, :])
    save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={**tensors, "z": z[None, :]}, meta=meta))
