"""The black-box prompt-tuning loop: nevergrad ask/tell, one HTTP request per generation.

    z [P, d] = [opt.ask() for _ in range(P)]  ->  PromptProjection  ->  ClipClient.infer  ->  loss [P]
    -> opt.tell(candidate, loss) for each evaluated candidate

Training queries (candidates evaluated for the optimizer) stop exactly at ``budget``: the last
generation is truncated. Every other query (initial loss, the recommendation's loss, validation,
zero-shot and tuned test accuracy) is an evaluation query, counted apart.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nevergrad as ng
from nevergrad.optimization.base import ConfiguredOptimizer
import numpy as np
from tqdm import tqdm

from bptvlm.shared.errors import BudgetExhaustedError, NotFoundError
from bptvlm.shared.protocol import (
    CLASS_NAMES,
    IMAGE_BATCH,
    LABELS,
    LOGITS,
    LOSS,
    PARAM_CONTEXT_INIT,
    PARAM_LOSS,
    PARAM_VISUAL_PROMPT_POSITION,
    PROTOCOL_VERSION,
    TEXT_CONTEXT,
    VISUAL_PROMPT,
    ModelMetadata,
    PromptLimits,
    Usage,
    vision_positions,
)

from .api import ClipClient, InferResult
from .checkpoint import CHECKPOINT_FILE, Checkpoint, data_fingerprint, load_checkpoint, save_checkpoint
from .artifacts import PROGRESS_FILE, PROMPTS_FILE, SUMMARY_FILE, ProgressLog, SavedPrompts, load_prompts, save_prompts, write_json
from .data import TaskLike
from .projection import PLACEMENTS, TEXT_CONTEXTS, PromptProjection

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."
LOSSES = ("ce", "focal")
# variant -> (tune text, tune vision)
VARIANTS: dict[str, tuple[bool, bool]] = {"joint": (True, True), "text": (True, False), "vision": (False, True)}


def optimizer_class(name: str) -> Any:
    """``ng.optimizers.registry[name]``, or a ``ValueError`` listing close names."""
    registry = ng.optimizers.registry
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=8, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; e.g. CMA, DiagonalCMA, TBPSA, OnePlusOne, NGOpt"
    raise ValueError(f"unknown nevergrad optimizer {name!r}{hint}")


@dataclass
class TuneConfig:
    """Everything that defines a tuning run besides the data and the server."""

    optimizer: str = "CMA"
    popsize: int = 30
    budget: int = 600
    seed: int = 0
    d_text: int = 500
    d_vision: int = 500
    n_ctx_text: int | None = None  # None: 8, or the template prefix's token count if larger
    n_ctx_vision: int | None = None  # None: 5 appended tokens, or one per vision position for 'add'
    sigma: float = 1.0
    template: str | None = None  # None: the task's own template, else DEFAULT_TEMPLATE
    loss: str = "ce"
    visual_prompt_position: str = "pre_ln"
    variant: str = "joint"
    text_context: str = "shared"  # one of TEXT_CONTEXTS

    def __post_init__(self) -> None:
        optimizer_class(self.optimizer)
        if self.popsize < 1:
            raise ValueError(f"popsize must be >= 1, received {self.popsize}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 query, received {self.budget}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, received {self.variant!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, received {self.loss!r}")
        if self.text_context not in TEXT_CONTEXTS:
            raise ValueError(f"text_context must be one of {TEXT_CONTEXTS}, received {self.text_context!r}")
        if self.text_context == "mixed" and self.d_text < 2:
            raise ValueError(f"text_context 'mixed' splits d_text between a shared and a per-class part; d_text={self.d_text}")
        if self.visual_prompt_position not in PLACEMENTS:
            raise ValueError(f"visual_prompt_position must be one of {PLACEMENTS}, received {self.visual_prompt_position!r}")
        if self.template is not None:
            Template(self.template)
        if self.dims() == (0, 0):
            raise ValueError(f"variant {self.variant!r} with these dims/n_ctx leaves nothing to tune")

    def dims(self) -> tuple[int, int]:
        """Effective (d_text, d_vision) after the variant and zero n_ctx switch modalities off."""
        text, vision = VARIANTS[self.variant]
        d_text = self.d_text if text and (self.n_ctx_text is None or self.n_ctx_text > 0) else 0
        d_vision = self.d_vision if vision and (self.n_ctx_vision is None or self.n_ctx_vision > 0) else 0
        return d_text, d_vision


DEFAULT_N_CTX_TEXT = 8  # the paper's context length; longer only when the template prefix needs more tokens
DEFAULT_N_CTX_VISION = 5  # the paper's visual prompt tokens (appended placements)
MAX_TEXT_PROJECTION_BYTES = 2**30  # a per-class context's A_text grows with the classes: 1,000 ViT-B/32 classes ~8 GB


@dataclass(frozen=True)
class Template:
    """A hand-written prompt with one ``{}``: ``"a photo of a {}."``.

    With a tuned text context the server gets ``prefix`` as ``context_init`` (its token embeddings
    are added to the context, so z = 0 reproduces the template) and ``class_text(name)`` as the class
    name: the template from ``{}`` on, e.g. ``"dog."``.
    """

    text: str

    def __post_init__(self) -> None:
        if self.text.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}', received {self.text!r}")

    @property
    def prefix(self) -> str:
        return self.text.split("{}", 1)[0].strip()

    def class_text(self, name: str) -> str:
        return name + self.text.split("{}", 1)[1]

    def full(self, name: str) -> str:
        return self.text.replace("{}", name)


@dataclass
class QueryCount:
    """Candidates sent, by purpose (one candidate = one query, the paper's unit)."""

    train: int = 0
    eval: int = 0


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """logits [P, N, C], labels [N] -> accuracy [P]."""
    return np.asarray((logits.argmax(-1) == labels[None, :]).mean(-1), dtype=np.float64)


class RemoteTask:
    """The task's labelled image sets on the server, queried with a population of prompts."""

    def __init__(self, client: ClipClient, data: TaskLike, template: Template, config: TuneConfig) -> None:
        self.client = client
        self.template = template
        self.config = config
        self.class_names = list(data.class_names)
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "train": (data.train_images, np.asarray(data.train_labels, dtype=np.int64)),
            "test": (data.test_images, np.asarray(data.test_labels, dtype=np.int64)),
        }
        if data.val_images is not None and data.val_labels is not None and len(data.val_labels):
            self.splits["val"] = (data.val_images, np.asarray(data.val_labels, dtype=np.int64))
        self.count = QueryCount()
        self.run_id: str | None = None
        """With it, a query's request id is ``{run_id}-{tag}``: the same on a retry and when a resumed
        run sends the same generation again, so a server can answer a duplicate without charging it."""

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split][1]

    def _inputs(self, split: str, prompts: dict[str, np.ndarray], *, force_upload: bool = False) -> dict[str, np.ndarray]:
        images, labels = self.splits[split]
        batch_id = self.client.upload_images(images, force=force_upload)
        texts = [self.template.class_text(n) if TEXT_CONTEXT in prompts else self.template.full(n) for n in self.class_names]
        return {
            **prompts,
            IMAGE_BATCH: np.array([batch_id.encode()], dtype=object),
            LABELS: labels,
            CLASS_NAMES: np.array([t.encode() for t in texts], dtype=object),
        }

    def _parameters(self, prompts: dict[str, np.ndarray]) -> dict[str, Any]:
        params: dict[str, Any] = {PARAM_LOSS: self.config.loss}
        if TEXT_CONTEXT in prompts and self.template.prefix:
            params[PARAM_CONTEXT_INIT] = self.template.prefix
        if VISUAL_PROMPT in prompts:
            params[PARAM_VISUAL_PROMPT_POSITION] = self.config.visual_prompt_position
        return params

    def query(
        self, split: str, prompts: dict[str, np.ndarray], *, outputs: tuple[str, ...], purpose: str, tag: str | None = None
    ) -> InferResult:
        """One request for a population (P = leading dim of the prompts; 1 without prompts)."""
        pop = next(iter(prompts.values())).shape[0] if prompts else 1
        params = self._parameters(prompts)
        rid = f"{self.run_id}-{tag}" if self.run_id and tag else None
        try:
            result = self.client.infer(self._inputs(split, prompts), outputs=outputs, parameters=params, request_id=rid)
        except NotFoundError as exc:  # the server forgot the uploaded images (restart, eviction)
            logger.warning("%s; uploading the %s images again", exc.message, split)
            inputs = self._inputs(split, prompts, force_upload=True)  # a new body, so a new id
            result = self.client.infer(inputs, outputs=outputs, parameters=params, request_id=rid and f"{rid}-reupload")
        setattr(self.count, purpose, getattr(self.count, purpose) + pop)
        return result

    def losses(self, split: str, prompts: dict[str, np.ndarray], purpose: str = "eval", tag: str | None = None) -> np.ndarray:
        """Loss float32 [P] on a split."""
        loss = self.query(split, prompts, outputs=(LOSS,), purpose=purpose, tag=tag).loss
        assert loss is not None
        return loss

    def accuracies(self, split: str, prompts: dict[str, np.ndarray], tag: str | None = None) -> np.ndarray:
        """Accuracy [P] on a split (evaluation queries)."""
        logits = self.query(split, prompts, outputs=(LOGITS,), purpose="eval", tag=tag).logits
        assert logits is not None
        return accuracy(logits, self.labels(split))


# pycma's step-size adaptation (TPA) warns on every generation where nevergrad's mirrored samples look
# inconsistent to it; the search is unaffected and the warning drowns the progress output.
warnings.filterwarnings("ignore", message="TPA: apparent inconsistency", category=UserWarning)


def make_optimizer(config: TuneConfig, dimension: int) -> Any:
    """The nevergrad optimizer over z in R^dimension, starting at 0, seeded."""
    parametrization = ng.p.Array(init=np.zeros(dimension))
    parametrization.random_state = np.random.RandomState(config.seed)
    cls = optimizer_class(config.optimizer)
    if isinstance(cls, ConfiguredOptimizer) and "popsize" in cls.config():
        # e.g. DiagonalCMA: make its generation our request, not max(popsize, 4 + 3 ln d)
        cls = type(cls)(**{**cls.config(), "popsize": config.popsize})
    try:
        return cls(parametrization=parametrization, budget=config.budget, num_workers=config.popsize)
    except ValueError as exc:
        raise ValueError(f"optimizer {config.optimizer} with popsize {config.popsize}: {exc}") from None


@dataclass
class _Search:
    """Training-loop state."""

    best_loss: float = float("inf")
    best_z: np.ndarray | None = None
    best_generation: int = -1
    generations: int = 0
    interrupted: bool = False


def _finite(losses: np.ndarray) -> np.ndarray:
    """Non-finite losses become a large finite value the optimizer can rank."""
    losses = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
        logger.warning("%d candidates got a non-finite loss; treating them as very bad", int(bad.sum()))
        worst = np.max(losses[~bad], initial=0.0)
        losses = np.where(bad, max(1e6, 10 * abs(worst)), losses)
    return losses


def _train(
    task: RemoteTask,
    projection: PromptProjection,
    opt: Any,
    search: _Search,
    run: _Checkpointer,
    log: ProgressLog,
    progress: bool,
) -> None:
    """Run generations until the budget is spent; update ``search`` as they return and checkpoint
    after each one (so a crash re-asks at most the generation in flight, from the same state)."""
    config = task.config
    bar = tqdm(
        total=config.budget, initial=task.count.train, unit="query", desc="tuning",
        disable=not (progress and sys.stderr.isatty()),
    )  # fmt: skip
    try:
        while task.count.train < config.budget:
            n = min(config.popsize, config.budget - task.count.train)
            candidates = [opt.ask() for _ in range(n)]
            z = np.stack([c.value for c in candidates]).astype(np.float32)  # [n, d]
            losses = _finite(task.losses("train", projection(z), purpose="train", tag=f"g{search.generations}"))
            for candidate, loss in zip(candidates, losses):
                opt.tell(candidate, float(loss))
            i = int(np.argmin(losses))
            if losses[i] < search.best_loss:
                search.best_loss, search.best_z, search.best_generation = float(losses[i]), z[i].copy(), search.generations
            record = {
                "generation": search.generations,
                "queries": task.count.train,
                "best_loss": search.best_loss,
                "mean_loss": float(losses.mean()),
                "min_loss": float(losses[i]),
                "wall_s": round(run.elapsed(), 4),
            }
            log.write(record)
            search.generations += 1
            run.commit(
                generation=search.generations,
                best_loss=search.best_loss,
                best_z=search.best_z,
                best_generation=search.best_generation,
                progress=[*run.state.progress, record],
                optimizer=pickle.dumps(opt, protocol=pickle.HIGHEST_PROTOCOL),
            )
            bar.update(n)
            bar.set_postfix(best=f"{search.best_loss:.4f}")
            logger.debug("generation %(generation)d: %(queries)d queries, best %(best_loss).4f", record)
    except KeyboardInterrupt:
        search.interrupted = True
        logger.warning("interrupted after %d training queries; evaluating what was found", task.count.train)
    finally:
        bar.close()


class _Checkpointer:
    """The run's checkpoint in memory and on disk. ``commit`` stamps the counters and writes it;
    ``state`` changes only once the file is written, so an interrupt never leaves a half-updated one."""

    def __init__(self, path: Path, state: Checkpoint, task: RemoteTask) -> None:
        self.path = path
        self.state = state
        self.task = task
        self._start = time.perf_counter() - state.elapsed_s
        self._usage_base = Usage.model_validate(state.server_usage) if state.server_usage else Usage()
        self._usage_before = task.client.usage
        task.count = QueryCount(train=state.train_queries, eval=state.eval_queries)
        task.run_id = state.run_id

    def elapsed(self) -> float:
        """Wall seconds since the run started, over every process that worked on it."""
        return time.perf_counter() - self._start

    def server_usage(self) -> dict[str, int]:
        """What the server reported for the run's requests, this process's added to earlier ones'."""
        now, before = self.task.client.usage.model_dump(), self._usage_before.model_dump()
        return {k: v + now[k] - before[k] for k, v in self._usage_base.model_dump().items()}

    def commit(self, **changes: Any) -> None:
        new = replace(
            self.state,
            **changes,
            train_queries=self.task.count.train,
            eval_queries=self.task.count.eval,
            server_usage=self.server_usage(),
            elapsed_s=self.elapsed(),
        )
        save_checkpoint(self.path, new)
        self.state = new


@dataclass
class _Setup:
    """What a run derives from the server's metadata, the data and the config (fresh or resumed)."""

    metadata: ModelMetadata
    model_id: str
    template: Template
    projection: PromptProjection
    task: RemoteTask
    fingerprint: str


def text_context_length(tokens: Any, n_ctx_text: int | None, template: Template) -> int:
    """Context vectors of the text prompt: ``n_ctx_text``, or by default the paper's 8, or more if the
    template's prefix has more tokens under the served tokenizer. ``tokens`` counts them: a
    ``ClipClient`` (asks the server, free) or the served ``PromptedCLIP`` (the white-box CoOp baseline).

    The server adds the prefix's token embeddings to the first vectors; the rest start as zero
    embeddings, which are not neutral tokens, so z = 0 is close to the template but not it (shape on
    the embedded model: 0.44 vs 0.55; count: 0.945 vs 0.885; `python scripts/context_start.py`). Exactly the prefix's length would make
    z = 0 the template, but it halves the context, and capacity won (bench, 2,000 queries, seed 0:
    colour_synonym 34.0 vs 15.8, shape_synonym 50.3 vs 41.0 with 8 vs 4 vectors; CoOp 45.0 vs 13.5 and
    70.3 vs 41.3). The untuned template stays exactly available: it is a candidate of the final choice.
    """
    if n_ctx_text is not None:
        return n_ctx_text
    return max(DEFAULT_N_CTX_TEXT, tokens.count_tokens([template.prefix])[0] if template.prefix else 0)


def visual_prompt_length(limits: PromptLimits, config: TuneConfig) -> int:
    """Visual prompt vectors: ``config.n_ctx_vision``, or by default 5 appended tokens (the paper's)
    or, for ``add``, one per vision position."""
    if config.n_ctx_vision is not None:
        return config.n_ctx_vision
    return vision_positions(limits) if config.visual_prompt_position == "add" else DEFAULT_N_CTX_VISION


def build_projection(
    client: ClipClient, limits: PromptLimits, config: TuneConfig, template: Template, num_classes: int
) -> PromptProjection:
    """The client's projection for ``config``, with the default prompt lengths resolved."""
    d_text, d_vision = config.dims()
    class_contexts = 0 if config.text_context == "shared" else num_classes
    n_ctx = text_context_length(client, config.n_ctx_text, template) if d_text else 0
    size = d_text * max(1, class_contexts) * n_ctx * limits.text_width * 4
    if size > MAX_TEXT_PROJECTION_BYTES:
        raise ValueError(
            f"text_context {config.text_context!r} with {num_classes} classes needs a {size / 2**30:.1f} GiB projection "
            f"(d_text x classes x n_ctx x {limits.text_width} floats) and as many context vectors per candidate; "
            f"use --text-context shared, or fewer classes"
        )
    return PromptProjection(
        limits,
        n_ctx_text=n_ctx,
        n_ctx_vision=visual_prompt_length(limits, config) if d_vision else 0,
        d_text=d_text,
        d_vision=d_vision,
        sigma=config.sigma,
        seed=config.seed,
        visual_prompt_position=config.visual_prompt_position,
        class_contexts=class_contexts,
        shared_text_dims=d_text // 2 if config.text_context == "mixed" else 0,
    )


def _setup(client: ClipClient, data: TaskLike, config: TuneConfig) -> _Setup:
    metadata = client.model_metadata()
    limits = client.prompt_limits(metadata)
    model_id = str(metadata.parameters.get("model_id", metadata.name))
    template = Template(config.template or getattr(data, "template", None) or DEFAULT_TEMPLATE)
    projection = build_projection(client, limits, config, template, len(data.class_names))
    # the lengths the defaults resolved to are part of the run (checkpoint, summary): a resume reuses them
    config = replace(config, n_ctx_text=projection.n_ctx_text, n_ctx_vision=projection.n_ctx_vision)
    task = RemoteTask(client, data, template, config)
    fingerprint = data_fingerprint(task.class_names, task.splits)
    return _Setup(metadata, model_id, template, projection, task, fingerprint)


def run_tuning(
    client: ClipClient,
    data: TaskLike,
    config: TuneConfig,
    out_dir: str | Path,
    progress: bool = True,
    *,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tune prompts for ``data`` through ``client``; write summary.json, progress.jsonl,
    prompts.safetensors and (every generation) checkpoint.pkl to ``out_dir``; return the summary.

    ``extra`` (JSON-like) is kept in the checkpoint for whoever resumes the run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / CHECKPOINT_FILE).exists():
        logger.warning("%s holds an earlier run's checkpoint; starting a new run over it (--resume continues one)", out)
    setup = _setup(client, data, config)
    config = setup.task.config  # with the context lengths resolved
    opt = make_optimizer(config, setup.projection.dimension)
    state = Checkpoint(
        config=asdict(config),
        run_id=uuid.uuid4().hex,
        model_id=setup.model_id,
        data_fingerprint=setup.fingerprint,
        template=setup.template.text,
        optimizer=pickle.dumps(opt, protocol=pickle.HIGHEST_PROTOCOL),
        extra=dict(extra or {}),
    )
    return _execute(setup, out, state, progress)


def resume_tuning(client: ClipClient, data: TaskLike, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Continue the run checkpointed in ``out_dir`` (same config, same total budget) and return its
    summary, which equals an uninterrupted run's but for ``wall_s``. A finished run is not touched:
    its summary comes back without a query. ``CheckpointError`` if the model or data differ."""
    out = Path(out_dir)
    state = load_checkpoint(out / CHECKPOINT_FILE)
    if state.done and state.summary is not None:
        logger.info("the run in %s is finished; nothing to resume", out)
        return state.summary
    setup = _setup(client, data, TuneConfig(**state.config))
    state.check(model_id=setup.model_id, data_fingerprint=setup.fingerprint, template=setup.template.text)
    logger.info(
        "resuming %s at generation %d: %d of %d training queries spent",
        out, state.generation, state.train_queries, setup.task.config.budget,
    )  # fmt: skip
    return _execute(setup, out, state, progress)


def _execute(setup: _Setup, out: Path, state: Checkpoint, progress: bool) -> dict[str, Any]:
    """Train from ``state`` to the budget, evaluate, write the outputs; checkpoint all along."""
    task, projection, template, config = setup.task, setup.projection, setup.template, setup.task.config
    run = _Checkpointer(out / CHECKPOINT_FILE, state, task)
    run.commit()
    logger.info(
        "tuning %s on %s: %d classes, %d train images, budget %d, %s popsize %d, z in R^%d",
        config.variant, setup.model_id, len(task.class_names), len(task.labels("train")),
        config.budget, config.optimizer, config.popsize, projection.dimension,
    )  # fmt: skip
    zero = np.zeros((1, projection.dimension), dtype=np.float32)
    if run.state.initial_loss is None:
        run.commit(initial_loss=float(task.losses("train", projection(zero), tag="initial")[0]))
    initial_loss = run.state.initial_loss
    assert initial_loss is not None
    d_text, d_vision = config.dims()
    meta = {
        "model": setup.model_id,
        "model_name": setup.metadata.name,
        "template": template.text,
        "context_init": template.prefix,
        "class_names": task.class_names,
        "class_texts": [template.class_text(n) for n in task.class_names],
        "protocol_version": PROTOCOL_VERSION,
        **{k: v for k, v in asdict(config).items() if k != "template"},
        **projection.config(),
    }
    s = run.state
    search = _Search(best_loss=s.best_loss, best_z=s.best_z, best_generation=s.best_generation, generations=s.generation)
    opt = s.load_optimizer()
    log = ProgressLog(out / PROGRESS_FILE, history=s.progress)  # drops lines written after the checkpoint
    try:
        _train(task, projection, opt, search, run, log, progress)
    except BudgetExhaustedError:
        logger.error("the server's budget for this key is spent after %d training queries", task.count.train)
        if search.best_z is not None:  # keep what was paid for
            _save(out, projection, search.best_z, {**meta, "selected": "best", "incomplete": True})
            logger.error("best prompt so far (train loss %.4f) saved to %s", search.best_loss, out / PROMPTS_FILE)
        raise
    finally:
        log.close()
    if search.best_z is None:  # interrupted before the first generation returned
        search.best_z, search.best_loss = zero[0], initial_loss

    result = _select_and_test(task, projection, search, opt)
    _save(out, projection, result.pop("_z"), {**meta, "selected": result["selected"]})

    summary = {
        **asdict(config),
        "template": template.text,
        "context_init": template.prefix,
        "d_text": d_text,
        "d_vision": d_vision,
        "model": setup.model_id,
        "model_name": setup.metadata.name,
        "model_versions": setup.metadata.versions,
        "endpoint": task.client.endpoint,
        "class_names": task.class_names,
        "num_train": len(task.labels("train")),
        "num_val": len(task.labels("val")) if "val" in task.splits else 0,
        "num_test": len(task.labels("test")),
        "initial_train_loss": initial_loss,
        "best_train_loss": search.best_loss,
        "best_generation": search.best_generation,
        "generations": search.generations,
        "interrupted": search.interrupted,
        **result,
        "train_queries": task.count.train,
        "eval_queries": task.count.eval,
        "server_usage": run.server_usage(),
        "wall_s": round(run.elapsed(), 3),
    }
    write_json(out / SUMMARY_FILE, summary)
    # an interrupted run keeps its last generation's optimizer and can be resumed; its evaluation
    # queries were spent all the same, so the counters move on
    run.commit(done=not search.interrupted, summary=None if search.interrupted else summary)
    logger.info(
        "zero-shot %.4f -> tuned %.4f test accuracy; train loss %.4f -> %.4f in %d queries (+%d for evaluation)",
        summary["zero_shot_accuracy"], summary["test_accuracy"], initial_loss, search.best_loss,
        task.count.train, task.count.eval,
    )  # fmt: skip
    return summary


def _save(out: Path, projection: PromptProjection, z: np.ndarray | None, meta: dict[str, Any]) -> None:
    """prompts.safetensors for one z [d]: its prompt tensors (population of one) and z itself; for
    ``z = None`` (the untuned template won) no prompt tensors, so applying the file is zero-shot."""
    if z is None:
        save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={"z": np.zeros((1, projection.dimension), np.float32)},
                                                      meta={**meta, "prompt": "none: the untuned template"}))
        return
    tensors = projection(z[None, :])
    save_prompts(out / PROMPTS_FILE, SavedPrompts(tensors={**tensors, "z": z[None, :]}, meta=meta))


def choose_on_validation(
    loss: np.ndarray, logits: np.ndarray, labels: np.ndarray, names: list[str]
) -> tuple[int, dict[str, float]]:
    """Index of the prompt with the highest validation accuracy, ties broken by the lower validation
    loss, given one validation request's ``loss`` [P] and ``logits`` [P, N, C] for the population
    ``names``; plus ``val_accuracy_<name>`` and ``val_loss_<name>`` of each.

    Accuracy decides because it is what is reported: on an over-confident model the search can cut
    the cross-entropy by flattening the logits while accuracy falls (embedded model, shape, vision
    `add` prompts: val loss 4.51 -> 2.88 but val accuracy 0.60 -> 0.48, test 0.55 -> 0.37;
    `scripts/compare_variants.py`, BENCHMARKS.md). With 8 images a class, accuracies tie often; the
    loss breaks the ties.
    """
    acc = accuracy(logits, labels)
    pick = min(range(len(names)), key=lambda i: (-float(acc[i]), float(loss[i])))
    scores = {f"val_accuracy_{n}": float(a) for n, a in zip(names, acc)}
    scores.update({f"val_loss_{n}": float(v) for n, v in zip(names, loss)})
    return pick, scores


def _select_and_test(task: RemoteTask, projection: PromptProjection, search: _Search, opt: Any) -> dict[str, Any]:
    """Choose among the best candidate seen, the optimizer's recommendation and, when there is a
    validation split, the untuned template (no prompt at all: exactly zero-shot) by validation
    accuracy, ties broken by validation loss (without one: best vs recommendation by training loss);
    test each.

    Keeping the template in the running means a search that only fitted the 16 shots falls back to
    zero-shot instead of shipping a prompt that generalises worse (`choose_on_validation`).
    ``_z`` of the result is None when the template wins."""
    assert search.best_z is not None
    rec_z = np.asarray(opt.provide_recommendation().value, dtype=np.float32)
    at = f"g{search.generations}"  # request-id tags: the same state asks the same questions
    out: dict[str, Any] = {}
    candidates = {"best": search.best_z}
    train_losses = [search.best_loss]
    if not np.array_equal(rec_z, search.best_z):
        candidates["recommendation"] = rec_z
        train_losses.append(float(task.losses("train", projection(rec_z[None, :]), tag=f"{at}-rec-train")[0]))
    out["recommendation_train_loss"] = train_losses[-1]
    names = list(candidates)
    prompts = projection(np.stack(list(candidates.values())))
    if "val" in task.splits:
        val = task.query("val", prompts, outputs=(LOSS, LOGITS), purpose="eval", tag=f"{at}-val")
        plain = task.query("val", {}, outputs=(LOSS, LOGITS), purpose="eval", tag=f"{at}-val-template")
        assert val.loss is not None and val.logits is not None and plain.loss is not None and plain.logits is not None
        loss, logits = np.concatenate([val.loss, plain.loss]), np.concatenate([val.logits, plain.logits])
        pick, scores = choose_on_validation(loss, logits, task.labels("val"), [*names, "template"])
        out["selected_by"] = "val_accuracy"
        out.update(scores)
    else:
        pick = int(np.argmin(train_losses))
        out["selected_by"] = "train_loss"
    acc = dict(zip(names, task.accuracies("test", prompts, tag=f"{at}-test").astype(float).tolist()))
    acc["template"] = float(task.accuracies("test", {}, tag=f"{at}-zero-shot")[0])
    out.update({f"test_accuracy_{name}": value for name, value in acc.items()})
    out.setdefault("test_accuracy_recommendation", acc["best"])
    out["selected"] = [*names, "template"][pick]
    out["test_accuracy"] = acc[out["selected"]]
    out["zero_shot_accuracy"] = acc["template"]
    out["_z"] = candidates.get(out["selected"])
    return out


def evaluate_saved(client: ClipClient, prompts_path: str | Path, data: TaskLike) -> dict[str, Any]:
    """Test accuracy of saved prompts on ``data`` (and zero-shot with the same template), via the API.

    A shared text context is class-agnostic, so the data's class names may differ from the tuning
    run's; a per-class context belongs to the run's classes, in their order.
    """
    saved = load_prompts(prompts_path)
    meta = saved.meta
    metadata = client.model_metadata()
    model_id = str(metadata.parameters.get("model_id", metadata.name))
    if meta.get("model") != model_id:
        logger.warning("prompts were tuned on model %r, the server serves %r", meta.get("model"), model_id)
    context = saved.tensors.get(TEXT_CONTEXT)
    if list(meta.get("class_names", [])) != list(data.class_names):
        if context is not None and context.ndim == 4:  # [1, C, n, D]
            raise ValueError(f"{prompts_path} holds one text context per class of its run's {context.shape[1]} classes "
                             f"(class_names in its metadata); the data's {len(data.class_names)} classes differ")
        logger.warning("class names differ from the tuning run's; applying the context to the new ones")
    config = TuneConfig(
        loss=meta.get("loss", "ce"),
        visual_prompt_position=meta.get("visual_prompt_position", "pre_ln"),
        template=meta["template"],
        budget=1,
    )
    task = RemoteTask(client, data, Template(meta["template"]), config)
    tuned = float(task.accuracies("test", saved.prompts())[0])
    zero_shot = float(task.accuracies("test", {})[0])
    return {
        "prompts": str(prompts_path),
        "model": model_id,
        "template": meta["template"],
        "num_test": len(task.labels("test")),
        "test_accuracy": tuned,
        "zero_shot_accuracy": zero_shot,
        "eval_queries": task.count.eval,
    }
