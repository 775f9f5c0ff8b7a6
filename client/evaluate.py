"""Saved prompts applied to a data set's test split through the API (``bptvlm eval``, ``bptvlm.evaluate``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bptvlm.shared.protocol import TEXT_CONTEXT

from .api import ClipClient
from .artifacts import load_prompts
from .config import Template, TuneConfig
from .data import TaskLike
from .feedback import access_of
from .objective import RemoteTask
from .run import model_id_of

logger = logging.getLogger(__name__)


def evaluate_saved(client: ClipClient, prompts_path: str | Path, data: TaskLike, *, force: bool = False) -> dict[str, Any]:
    """Test accuracy of saved prompts on ``data`` (and zero-shot with the same template), via the API.

    Prompts tuned on another model are refused unless ``force`` (they live in that model's embedding
    space). A shared text context is class-agnostic, so the data's class names may differ from the
    tuning run's; a per-class context belongs to the run's classes, in their order.
    """
    saved = load_prompts(prompts_path)
    meta = saved.meta
    metadata = client.model_metadata()
    model_id = model_id_of(metadata)
    if meta.get("model") != model_id:
        if not force:
            raise ValueError(f"{prompts_path} was tuned on model {meta.get('model')!r}, the server serves {model_id!r}: "
                             "prompts are vectors in their model's embedding space; evaluate against that model, or "
                             "pass --force (force=True) to apply them anyway")
        logger.warning("prompts were tuned on model %r, the server serves %r (forced)", meta.get("model"), model_id)
    context = saved.tensors.get(TEXT_CONTEXT)
    if list(meta.get("class_names", [])) != list(data.class_names):
        if context is not None and context.ndim == 4:  # [1, C, n, D]
            raise ValueError(f"{prompts_path} holds one text context per class of its run's {context.shape[1]} classes "
                             f"(class_names in its metadata); the data's {len(data.class_names)} classes differ")
        logger.warning("class names differ from the tuning run's; applying the context to the new ones")
    config = TuneConfig(loss=meta.get("loss", "ce"), visual_prompt_position=meta.get("visual_prompt_position", "pre_ln"),
                        template=meta["template"], budget=1,
                        deep_prompt_mode=meta.get("deep_prompt_mode", "replace"))  # fmt: skip
    task = RemoteTask(client, data, Template(meta["template"]), config, access=access_of(metadata))
    tuned, zero_shot = task.accuracies("test", saved.prompts()), task.accuracies("test", {})
    if tuned is None or zero_shot is None:
        raise ValueError(f"this key's output policy '{task.access.policy}' returns no labels, so test accuracy cannot "
                         "be measured through the API; evaluate with a key that allows 'label'")
    own: dict[str, Any] = {}
    data_template = getattr(data, "template", None)
    if data_template and data_template != meta["template"]:  # another data set's own template (cross-data-set transfer)
        own_task = RemoteTask(client, data, Template(data_template), config, access=task.access)
        own_task.meter = task.meter
        own_zero = own_task.accuracies("test", {})
        own = {"data_template": data_template,
               "zero_shot_accuracy_data_template": None if own_zero is None else float(own_zero[0])}
    return {
        **own,
        "prompts": str(prompts_path),
        "model": model_id,
        "template": meta["template"],
        "num_test": len(task.labels("test")),
        "test_accuracy": float(tuned[0]),
        "zero_shot_accuracy": float(zero_shot[0]),
        "eval_queries": task.meter.eval,
    }
