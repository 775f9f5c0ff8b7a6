"""A tuning run: set up once from the server's metadata, search (``loop.run_search``), select, test.

``run_tuning`` starts one, ``resume_tuning`` continues a checkpointed one to the result an
uninterrupted run gets. With an output folder the run writes summary.json, progress.jsonl,
prompts.safetensors and (every generation) checkpoint.pkl; without one (the Python API) nothing.

Training queries stop exactly at the budget; every other query (initial loss, validation, the
recommendation's loss, zero-shot and tuned test accuracy) is an evaluation query, counted apart.
"""

from __future__ import annotations

import datetime
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
from .feedback import access_of, resolve_feedback
from .loop import LoopCallback, SearchState, run_search
from .objective import RemoteTask
from .projection import PromptProjection, build_projection
from .selection import select_prompt
from .strategies import Strategy, StrategySpec, make_strategy
from .tracking import CURVES_FILE, TensorBoardLog, ValidationCurve, eval_every_of, planned_curve_evals, plot_curves, run_curve

SELECTION_EVAL_QUERIES = 8  # at most: initial loss 1, validation 3, recommendation's loss 1, test 3

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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bptvlm")
    except PackageNotFoundError:
        return None


def check_quota(client: ClipClient, config: TuneConfig, spent: int = 0) -> None:
    """Refuse (``BudgetExhaustedError``) before spending a query when the key's remaining quota
    (``GET /v2/usage``) cannot pay the rest of the run: training to the budget plus evaluation."""
    report = client.usage_report()
    if report is None or report.remaining is None:
        return
    train = config.budget - spent
    evals = SELECTION_EVAL_QUERIES + planned_curve_evals(eval_every_of(config.eval_every, config.budget), config.budget,
                                                        config.popsize, spent)
    if report.remaining < train + evals:
        raise BudgetExhaustedError(
            f"this key has {report.remaining} queries left, the run needs {train + evals} ({train} training to --budget "
            f"{config.budget} + up to {evals} evaluation); lower --budget (or --eval-every 0) or ask the provider for more quota")


def _setup(client: ClipClient, data: TaskLike, config: TuneConfig, metadata: ModelMetadata | None = None) -> _Setup:
    if len(data.class_names) < 2:
        raise ValueError(f"classification needs at least 2 classes, the data has {len(data.class_names)}: "
                         f"{list(data.class_names)}")
    metadata = metadata or client.model_metadata()
    limits = client.prompt_limits(metadata)
    template = task_template(config, data)
    projection = build_projection(client, limits, config, template, len(data.class_names))
    # the lengths the defaults resolved to are part of the run (checkpoint, summary): a resume reuses them
    config = replace(config, n_ctx_text=projection.n_ctx_text, n_ctx_vision=projection.n_ctx_vision)
    access = access_of(metadata)  # the key's output policy: the feedback it allows (client/feedback.py)
    config = replace(config, feedback=resolve_feedback(config.feedback, access))
    task = RemoteTask(client, data, template, config, access=access)
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
    tensorboard: str | Path | None = None,
) -> TuneResult:
    """Tune prompts for ``data`` through ``client``; ``TuneResult`` with summary, prompts and history.
    ``out_dir`` None: no files. ``extra`` (JSON-like) is kept in the checkpoint for whoever resumes
    (``command``: the command line, recorded in the summary). ``tensorboard``: a folder for event files."""
    out = Path(out_dir) if out_dir is not None else None
    if config.budget < config.popsize:
        logger.warning("--budget %d is below --popsize %d: one generation of %d candidates, cut short; the strategy "
                       "never sees a whole population", config.budget, config.popsize, config.budget)  # fmt: skip
    check_quota(client, config)
    data, new = _protocol_split(data, config)
    setup = _setup(client, data, config, metadata)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    strategy = make_strategy(StrategySpec.of(setup.config, setup.projection))
    state = Checkpoint(config=asdict(setup.config), run_id=uuid.uuid4().hex, model_id=setup.model_id,
                       data_fingerprint=setup.fingerprint, template=setup.template.text, strategy=b"",
                       extra={"started_at": _now(), **(extra or {})})  # fmt: skip
    return _protocol_finish(_execute(setup, out, state, strategy, progress, tensorboard), client, new, setup, out)


def _protocol_split(data: TaskLike, config: TuneConfig) -> tuple[TaskLike, TaskLike | None]:
    """``protocol`` base2new: (the base classes, the new classes' test split); else (data, None)."""
    if config.protocol != "base2new":
        return data, None
    from .base2new import split_base_new

    return split_base_new(data)


def _protocol_finish(result: TuneResult, client: ClipClient, new: TaskLike | None, setup: _Setup,
                     out: Path | None) -> TuneResult:
    """base2new: the chosen prompt tested on the new classes too (summary and summary.json)."""
    if new is not None:
        from .base2new import add_new_classes

        result.summary = add_new_classes(result.summary, client, new, setup.config, setup.template, result.prompts, out)
        path = out / CHECKPOINT_FILE if out is not None else None
        if path is not None and path.is_file():  # a finished run re-reported by --resume shows the same summary
            state = load_checkpoint(path)
            if state.done:
                save_checkpoint(path, replace(state, summary=result.summary))
    return result


def resume_tuning(client: ClipClient, data: TaskLike, out_dir: str | Path, progress: bool = True, *,
                  budget: int | None = None, tensorboard: str | Path | None = None) -> dict[str, Any]:
    """Continue the run checkpointed in ``out_dir`` (same config, same total budget) and return its
    summary, which equals an uninterrupted run's but for ``wall_s``. A finished run is not touched:
    its summary comes back without a query, unless ``budget`` is larger than the run's: then it goes
    on from the saved strategy to the new total. ``CheckpointError`` if the model or data differ."""
    out = Path(out_dir)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    config = TuneConfig(**{k: v for k, v in state.config.items() if k in CONFIG_FIELDS})
    if budget is not None and budget != config.budget:
        if budget < max(config.budget, state.train_queries):
            raise ValueError(f"--budget {budget} is below the run's --budget {config.budget}: a run can only be "
                             "extended; start a new run for a smaller budget")
        logger.info("extending the run in %s from %d to %d training queries", out, config.budget, budget)
        config = replace(config, budget=budget)
        state.config = asdict(config)
        state.done, state.summary = False, None
    if state.done and state.summary is not None:
        logger.info("the run in %s is finished; nothing to resume", out)
        return state.summary
    check_quota(client, config, state.train_queries)
    data, new = _protocol_split(data, config)
    setup = _setup(client, data, config)
    state.check(model_id=setup.model_id, data_fingerprint=setup.fingerprint, template=setup.template.text)
    logger.info("resuming %s at generation %d: %d of %d training queries spent",
                out, state.generation, state.train_queries, setup.config.budget)  # fmt: skip
    strategy = state.load_strategy() if state.strategy else make_strategy(StrategySpec.of(setup.config, setup.projection))
    return _protocol_finish(_execute(setup, out, state, strategy, progress, tensorboard), client, new, setup, out).summary


def _execute(setup: _Setup, out: Path | None, state: Checkpoint, strategy: Strategy, progress: bool,
             tensorboard: str | Path | None = None) -> TuneResult:
    """Train from ``state`` to the budget, select, test, write the outputs; checkpoint all along."""
    task, projection, config = setup.task, setup.projection, setup.config
    if "val" not in task.splits:
        why = "--val-shots 0" if config.val_shots == 0 else "the data has no validation images"
        logger.warning("%s: the prompt is chosen by training loss, which can end below zero-shot; give --val-shots > 0 "
                       "and leave images for it (fewer --shots, or a smaller --test-fraction for a folder without "
                       "train/ and test/)", why)  # fmt: skip
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
    s = run.state
    search = SearchState(spent=s.train_queries, generations=s.generation, best_loss=s.best_loss, best_z=s.best_z,
                         best_generation=s.best_generation)  # fmt: skip
    bar = _Bar(config.budget, search.spent, progress and sys.stderr.isatty())
    curve = ValidationCurve(task, projection, eval_every_of(config.eval_every, config.budget), search.spent)
    board = TensorBoardLog(tensorboard, asdict(config)) if tensorboard is not None else None
    interrupted = exhausted = False

    def score(z: np.ndarray, tag: str) -> np.ndarray:
        return task.losses("train", projection(z), purpose="train", tag=tag)

    try:
        callbacks = [curve, run, bar, *([board] if board else [])]  # the curve first: it adds to the record
        run_search(score, strategy, budget=config.budget, popsize=config.popsize, state=search, callbacks=callbacks)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted after %d training queries; evaluating what was found", task.meter.train)
    except BudgetExhaustedError as exc:
        exhausted = True
        exc.summary = _exhausted(setup, out, run, search, strategy, initial_loss)  # type: ignore[attr-defined]
        raise
    finally:
        bar.bar.close()
        log.close()
        if board is not None and exhausted:
            board.finish(None)
    best_z, best_loss = (search.best_z, search.best_loss) if search.best_z is not None else (zero[0], initial_loss)
    chosen = select_prompt(task, projection, best_z, best_loss, strategy.recommend(), at=f"g{search.generations}",
                           report_all=True)  # fmt: skip
    prompts = projection(chosen.z[None, :]) if chosen.z is not None else {}
    if out is not None:
        _save(out, projection, chosen.z, {**_meta(setup), "selected": chosen.selected}, tensors=prompts)
    summary = {
        **_summary(setup, run, search, strategy, initial_loss),
        "interrupted": interrupted,
        **chosen.scores,
        "selected": chosen.selected,
        "selected_by": chosen.selected_by,
        "test_accuracy": chosen.test_accuracy,
        "zero_shot_accuracy": chosen.scores["test_accuracy_template"],
        "eval_queries": task.meter.eval,
        "server_usage": run.server_usage(),
    }
    _finish(out, summary, log.records)
    if board is not None:
        board.finish(summary)
    # an interrupted run keeps its last generation's strategy and can be resumed; its evaluation
    # queries were spent all the same, so the counters move on
    run.commit(done=not interrupted, summary=None if interrupted else summary)
    logger.info("zero-shot %s -> tuned %s test accuracy; train loss (%s) %.4f -> %.4f in %d queries (+%d for evaluation)",
                summary["zero_shot_accuracy"], summary["test_accuracy"], config.feedback, initial_loss, best_loss,
                task.meter.train, task.meter.eval)  # fmt: skip
    return TuneResult(summary=summary, prompts=prompts, history=list(log.records))


def _meta(setup: _Setup) -> dict[str, Any]:
    """What prompts.safetensors records about its run."""
    task, template, config = setup.task, setup.template, setup.config
    return {"model": setup.model_id, "model_name": setup.metadata.name, "template": template.text,
            "context_init": template.prefix, "class_names": task.class_names,
            "class_texts": [template.class_text(n) for n in task.class_names], "protocol_version": PROTOCOL_VERSION,
            **{k: v for k, v in asdict(config).items() if k != "template"}, **setup.projection.config()}  # fmt: skip


def _summary(setup: _Setup, run: _Checkpointer, search: SearchState, strategy: Strategy, initial_loss: float) -> dict[str, Any]:
    """The summary's fields that do not depend on the final selection."""
    task, projection, config = setup.task, setup.projection, setup.config
    return {
        **asdict(config),
        "config": asdict(config),
        "command": run.state.extra.get("command"),
        "version": _version(),
        "started_at": run.state.extra.get("started_at"),
        "finished_at": _now(),
        "strategy": strategy.describe(),
        "template": setup.template.text,
        "context_init": setup.template.prefix,
        "d_text": projection.d_text,
        "d_vision": projection.d_vision,
        "model": setup.model_id,
        "model_name": setup.metadata.name,
        "model_versions": setup.metadata.versions,
        "endpoint": task.client.endpoint,
        "endpoints": task.client.report() if hasattr(task.client, "report") else None,  # FanoutClient: shares, usage
        "class_names": task.class_names,
        "num_train": len(task.labels("train")),
        "num_val": len(task.labels("val")) if "val" in task.splits else 0,
        "num_test": len(task.labels("test")),
        "initial_train_loss": initial_loss,
        "best_train_loss": search.best_loss if search.best_z is not None else initial_loss,
        "best_generation": search.best_generation,
        "generations": search.generations,
        "train_queries": task.meter.train,
        "eval_queries": task.meter.eval,
        "server_usage": run.server_usage(),
        "wall_s": round(run.elapsed(), 3),
    }


def _exhausted(setup: _Setup, out: Path | None, run: _Checkpointer, search: SearchState, strategy: Strategy,
               initial_loss: float) -> dict[str, Any]:
    """The key's quota ran out mid-run: keep the best prompt so far (unvalidated, untested: that would
    cost queries) and a summary that says so. The checkpoint stays resumable with a new quota."""
    summary = {**_summary(setup, run, search, strategy, initial_loss), "quota_exhausted": True, "interrupted": True,
               "selected": "best" if search.best_z is not None else "template",
               "selected_by": "train_loss (quota exhausted: not validated)", "test_accuracy": None,
               "zero_shot_accuracy": None}  # fmt: skip
    if out is not None and search.best_z is not None:
        _save(out, setup.projection, search.best_z, {**_meta(setup), "selected": "best", "incomplete": True})
    _finish(out, summary, run.log.records)
    return summary


def _finish(out: Path | None, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """summary.json and curves.png in the run folder."""
    if out is None:
        return
    write_json(out / SUMMARY_FILE, summary)
    if records:
        try:
            plot_curves([run_curve(records, summary, summary["variant"])], out / CURVES_FILE,
                        title=f"{summary['model']}: {summary['strategy']}, {summary['variant']}")  # fmt: skip
        except (OSError, ValueError) as exc:  # a plot never costs the run
            logger.warning("could not draw %s: %s", out / CURVES_FILE, exc)


def _save(out: Path, projection: PromptProjection, z: np.ndarray | None, meta: dict[str, Any],
          tensors: dict[str, np.ndarray] | None = None) -> None:
    """prompts.safetensors for one z [d]: its prompt tensors (population of one; ``tensors`` when the
    caller already projected them) and z itself; for ``z = None`` (the untuned template won) no prompt
    tensors, so applying the file is zero-shot."""
    if z is None:
        save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={"z": np.zeros((1, projection.dimension), np.float32)},
                                                      meta={**meta, "prompt": "none: the untuned template"}))
        return
    tensors = tensors if tensors is not None else projection(z[None, :])
    save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={**tensors, "z": z[None, :]}, meta=meta))
