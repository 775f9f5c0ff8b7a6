"""The remote objective: a task's labelled image sets on the server, scored for a population of prompts.

Every request goes through ``RemoteTask.query``, which books it under its purpose (``train``: the
candidates the optimizer is told about, the paper's unit; ``eval``: everything else) in the
``Meter``: candidates sent, the server's reported usage, and wall seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bptvlm.shared.errors import NotFoundError
from bptvlm.shared.protocol import (CLASS_NAMES, IMAGE_BATCH, LABELS, LOSS, PARAM_CONTEXT_INIT, PARAM_LOSS,
                                    PARAM_OUTPUT_DECIMALS, PARAM_OUTPUT_NOISE, PARAM_VISUAL_PROMPT_POSITION,
                                    TEXT_CONTEXT, VISUAL_PROMPT, OutputAccess, Usage)
from bptvlm.shared.protocol import PARAM_DEEP_PROMPT_MODE, TEXT_DEEP_PROMPT, VISUAL_DEEP_PROMPT

from .api import ClipClient, InferResult, add_usage
from .config import Template, TuneConfig
from .data import TaskLike
from .feedback import LEGACY_ACCESS, Feedback, accuracy_from, accuracy_output

logger = logging.getLogger(__name__)
PURPOSES = ("train", "eval")


@dataclass
class Meter:
    """Per purpose: candidates sent (the client's count), the server's usage, wall seconds."""

    queries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0))
    usage: dict[str, Usage] = field(default_factory=lambda: {p: Usage() for p in PURPOSES})
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0.0))

    def book(self, purpose: str, candidates: int, usage: Usage, seconds: float) -> None:
        self.queries[purpose] += candidates
        self.usage[purpose] = add_usage(self.usage[purpose], usage)
        self.seconds[purpose] += seconds

    @property
    def train(self) -> int:
        return self.queries["train"]

    @property
    def eval(self) -> int:
        return self.queries["eval"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """logits [P, N, C], labels [N] -> accuracy [P]."""
    return np.asarray((logits.argmax(-1) == labels[None, :]).mean(-1), dtype=np.float64)


def finite_losses(losses: np.ndarray) -> np.ndarray:
    """Non-finite losses become a large finite value the optimizer can rank."""
    losses = np.asarray(losses, dtype=np.float64)
    bad = ~np.isfinite(losses)
    if bad.any():
        logger.warning("%d candidates got a non-finite loss; treating them as very bad", int(bad.sum()))
        worst = np.max(losses[~bad], initial=0.0)
        losses = np.where(bad, max(1e6, 10 * abs(worst)), losses)
    return losses


class RemoteTask:
    """The task's labelled image sets on the server, queried with a population of prompts."""

    def __init__(self, client: ClipClient, data: TaskLike, template: Template, config: TuneConfig, *,
                 access: OutputAccess | None = None) -> None:
        self.client = client
        self.access = access or LEGACY_ACCESS  # what the key may receive (client/feedback.py)
        self.feedback = Feedback.of(config.feedback or LOSS, self.access, config.loss)
        self.template = template
        self.config = config
        self.class_names = list(data.class_names)
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "train": (data.train_images, np.asarray(data.train_labels, dtype=np.int64)),
            "test": (data.test_images, np.asarray(data.test_labels, dtype=np.int64)),
        }
        if data.val_images is not None and data.val_labels is not None and len(data.val_labels):
            self.splits["val"] = (data.val_images, np.asarray(data.val_labels, dtype=np.int64))
        self.meter = Meter()
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
        mode = getattr(self.config, "deep_prompt_mode", "replace")
        if mode != "replace" and (TEXT_DEEP_PROMPT in prompts or VISUAL_DEEP_PROMPT in prompts):
            params[PARAM_DEEP_PROMPT_MODE] = mode
        return params

    def query(
        self, split: str, prompts: dict[str, np.ndarray], *, outputs: tuple[str, ...], purpose: str, tag: str | None = None,
        output_parameters: dict[str, dict[str, Any]] | None = None,
    ) -> InferResult:
        """One request for a population (P = leading dim of the prompts; 1 without prompts)."""
        pop = next(iter(prompts.values())).shape[0] if prompts else 1
        params = self._parameters(prompts)
        if split != "test":  # a simulated stricter service; test accuracy is the experimenter's, measured clean
            if self.config.output_noise > 0:
                params[PARAM_OUTPUT_NOISE] = self.config.output_noise
            if self.config.output_decimals is not None:
                params[PARAM_OUTPUT_DECIMALS] = self.config.output_decimals
        rid = f"{self.run_id}-{tag}" if self.run_id and tag else None
        start = time.perf_counter()
        try:
            result = self.client.infer(self._inputs(split, prompts), outputs=outputs, parameters=params, request_id=rid,
                                       output_parameters=output_parameters)
        except NotFoundError as exc:  # the server forgot the uploaded images (restart, eviction)
            logger.warning("%s; uploading the %s images again", exc.message, split)
            inputs = self._inputs(split, prompts, force_upload=True)  # a new body, so a new id
            result = self.client.infer(inputs, outputs=outputs, parameters=params, request_id=rid and f"{rid}-reupload",
                                       output_parameters=output_parameters)
        self.meter.book(purpose, pop, result.usage, time.perf_counter() - start)
        return result

    def losses(self, split: str, prompts: dict[str, np.ndarray], purpose: str = "eval", tag: str | None = None) -> np.ndarray:
        """The feedback objective's loss [P] on a split (``--feedback``: client/feedback.py)."""
        fb = self.feedback
        result = self.query(split, prompts, outputs=fb.outputs, purpose=purpose, tag=tag,
                            output_parameters=fb.output_parameters)
        return fb.loss(result.outputs, self.labels(split), len(self.class_names))

    def accuracies(self, split: str, prompts: dict[str, np.ndarray], tag: str | None = None) -> np.ndarray | None:
        """Accuracy [P] on a split (evaluation queries); None where the key's policy returns no labels."""
        output = accuracy_output(self.access)
        if output is None:
            return None
        return accuracy_from(self.query(split, prompts, outputs=(output,), purpose="eval", tag=tag).outputs,
                             self.labels(split))

    def assess(self, split: str, prompts: dict[str, np.ndarray], tag: str | None = None
               ) -> tuple[np.ndarray | None, np.ndarray]:
        """Accuracy [P] (None without labels: see ``accuracies``) and the feedback loss [P], in one request."""
        fb, output = self.feedback, accuracy_output(self.access)
        outputs = tuple(dict.fromkeys((*fb.outputs, *([output] if output else []))))
        result = self.query(split, prompts, outputs=outputs, purpose="eval", tag=tag,
                            output_parameters=fb.output_parameters)
        labels = self.labels(split)
        return accuracy_from(result.outputs, labels), fb.loss(result.outputs, labels, len(self.class_names))
