"""The notebook API: ``bptvlm.tune`` and ``bptvlm.evaluate``, the same run as ``bptvlm tune``/``eval``.

    import bptvlm
    result = bptvlm.tune("http://127.0.0.1:8000", "shape", budget=300)   # a built-in task, a folder, or arrays
    result = bptvlm.tune(url, dataset="OxfordPets", data_root="DATA", protocol="base2new")  # a benchmark by name
    result.summary["test_accuracy"], result.prompts["text_context"].shape, result.history[-1]["best_loss"]

No files are written unless ``out`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bptvlm.client.data import FewShotData, TaskLike

DataLike = str | Path | TaskLike | Mapping[str, Any]
"""A built-in task name, an ImageFolder directory, a benchmark's name (``OxfordPets``, read under the
``data_root`` setting), a ``FewShotData``, or a mapping with its fields
(``class_names``, ``train_images`` uint8 [N, H, W, 3], ``train_labels`` [N], ``test_images``,
``test_labels``, optionally ``val_images``/``val_labels``/``template``)."""


def _key(api_key: str | None) -> str | None:
    from bptvlm.cli.common import API_KEY_ENV

    return api_key or os.environ.get(API_KEY_ENV) or None


def _data(data: DataLike | None, config: Any, image_size: int) -> TaskLike:
    from bptvlm.data import is_dataset, load_data

    if data is None:
        if config.dataset is None:
            raise ValueError("no data: give data (a task, a folder, arrays) or dataset=NAME with data_root=DIR")
        data = config.dataset
    if isinstance(data, (str, Path)):
        folder = None if is_dataset(str(data)) else Path(data).is_dir() or None
        return load_data(str(data), seed=config.seed, shots=config.shots, val_shots=config.val_shots,
                         image_size=image_size, folder=folder, data_root=config.data_root)  # fmt: skip
    if isinstance(data, Mapping):
        return FewShotData(**dict(data))
    return data


def tune(
    endpoint: str | Sequence[str],
    data: DataLike | None = None,
    *,
    out: str | Path | None = None,
    preset: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    tensorboard: str | Path | None = None,
    **config: Any,
) -> Any:
    """Tune prompts for ``data`` through the server at ``endpoint`` (several: a list or ``"URL1,URL2"``, each
    generation split across them, client/fanout.py; key: ``api_key`` or the environment
    variable ``BPTVLM_API_KEY``); ``config``: any ``TuneConfig``
    field (``optimizer``, ``budget``, ``variant``, ...), over ``preset`` (default: ``default``).

    Returns a ``TuneResult``: ``.summary`` (dict), ``.prompts`` (name -> ndarray), ``.history``
    (one record per generation). A non-empty ``out`` is refused unless ``overwrite``.
    """
    from bptvlm.client.config import DEFAULT_PRESET, resolve_config
    from bptvlm.client.fanout import client_for
    from bptvlm.client.run import start
    from bptvlm.shared.protocol import DEFAULT_MODEL_NAME

    from bptvlm.cli.common import check_out

    resolved = resolve_config(preset or DEFAULT_PRESET, **config)
    if out is not None:
        check_out(out, overwrite=overwrite)
    with client_for(endpoint, api_key=_key(api_key), model=model or DEFAULT_MODEL_NAME) as client:
        metadata = client.model_metadata()
        few_shot = _data(data, resolved, client.prompt_limits(metadata).image_size)
        return start(client, few_shot, resolved, out, progress, metadata=metadata, tensorboard=tensorboard,
                     extra={"preset": preset or DEFAULT_PRESET})  # fmt: skip


def evaluate(endpoint: str, prompts: str | Path, data: DataLike, *, api_key: str | None = None,
             model: str | None = None, force: bool = False, data_root: str | None = None) -> dict[str, Any]:
    """Test accuracy of saved prompts (a ``prompts.safetensors``) and zero-shot on ``data``'s test split
    (a benchmark's name is read under ``data_root``: cross-data-set transfer)."""
    from bptvlm.data import is_dataset

    from bptvlm.client.api import ClipClient
    from bptvlm.client.evaluate import evaluate_saved
    from bptvlm.data import load_test_split
    from bptvlm.shared.protocol import DEFAULT_MODEL_NAME

    with ClipClient(endpoint, api_key=_key(api_key), model=model or DEFAULT_MODEL_NAME) as client:
        if isinstance(data, (str, Path)):
            size = client.prompt_limits().image_size
            folder = None if is_dataset(str(data)) else Path(data).is_dir() or None
            few_shot: TaskLike = load_test_split(str(data), image_size=size, folder=folder, data_root=data_root)
        else:
            few_shot = FewShotData(**dict(data)) if isinstance(data, Mapping) else data
        return evaluate_saved(client, prompts, few_shot, force=force)
