"""The tuner's checkpoint: everything a run needs to continue after the client or the server died.

``checkpoint.pkl`` in the run's output folder is rewritten after every generation, atomically (a
temporary file in the same folder, fsync, ``os.replace``, fsync of the folder): a crash leaves the
previous checkpoint or the new one, never a torn one. It is a pickle of a plain dict (see
``Checkpoint``) whose ``strategy`` entry is the pickled search strategy (its random state, the CMA
matrices and the recommendation bookkeeping travel with it). All of the run's randomness
lives there or in seeds in ``config``: the projection and the few-shot sample are rebuilt from
``config.seed``, and no global RNG is used.

Like any pickle, a checkpoint runs code when loaded: only resume runs you wrote yourself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import write_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = "bptvlm-checkpoint"
VERSION = 2  # 2: the strategy layer (client/strategies.py); progress lines counted, not copied


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another run (data, model, config)."""


def data_fingerprint(class_names: Sequence[str], splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 over the class names and every split's images (dtype, shape, bytes) and labels."""
    h = hashlib.sha256()
    h.update(repr(list(class_names)).encode())
    for name in sorted(splits):
        for array in splits[name]:
            array = np.ascontiguousarray(array)
            h.update(f"{name}:{array.dtype.str}{array.shape}".encode())
            h.update(array.tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """The state of a tuning run between two generations.

    config:           ``asdict(TuneConfig)``
    run_id:           random hex fixed at the start; request ids are derived from it, so a generation
                      re-sent after a crash carries the id of its first attempt
    model_id, data_fingerprint, template: what the run was tuned against; resuming elsewhere is refused
    generation:       generations completed (the next one to ask)
    train_queries, eval_queries: the client's query counters (candidates, by purpose)
    server_usage:     usage the server reported over the run's requests (``Usage.model_dump()``)
    initial_loss:     loss of z = 0 on the training split (None until asked)
    best_loss, best_z float32 [d], best_generation: the best candidate evaluated so far
    progress_lines:   how many progress.jsonl lines belong to the checkpointed generations (a resume
                      drops the lines after them, whose generations run again)
    elapsed_s:        wall time spent before this checkpoint, over every process of the run
    strategy:         the pickled strategy (client/strategies.py), as it was after the last ``tell``
    extra:            the caller's notes (the CLI keeps its data flags here, so --resume needs none)
    summary:          the final summary once the run finished (then ``done``)
    """

    config: dict[str, Any]
    run_id: str
    model_id: str
    data_fingerprint: str
    template: str
    strategy: bytes
    generation: int = 0
    train_queries: int = 0
    eval_queries: int = 0
    server_usage: dict[str, int] = field(default_factory=dict)
    initial_loss: float | None = None
    best_loss: float = float("inf")
    best_z: np.ndarray | None = None
    best_generation: int = -1
    progress_lines: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    summary: dict[str, Any] | None = None

    def load_strategy(self) -> Any:
        """The strategy as checkpointed."""
        return pickle.loads(self.strategy)

    def check(self, *, model_id: str, data_fingerprint: str, template: str) -> None:
        """Raise ``CheckpointError`` unless the run is resumed against the same model, data and template."""
        if model_id != self.model_id:
            raise CheckpointError(
                f"the run was tuned on model {self.model_id!r}, the server now serves {model_id!r}; "
                "resume against the same model or start a new run"
            )
        if data_fingerprint != self.data_fingerprint:
            raise CheckpointError(
                "the data differs from the run's (images, labels or class names changed: fingerprint "
                f"{data_fingerprint[:12]} != {self.data_fingerprint[:12]}); resume with the same data or start a new run"
            )
        if template != self.template:
            raise CheckpointError(f"the template differs from the run's: {template!r} != {self.template!r}")


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: the old file stays whole until the new one is."""
    payload = {"format": FORMAT, "version": VERSION, **asdict(checkpoint)}
    write_atomic(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a file written by ``save_checkpoint``; ``CheckpointError`` if absent or not one."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume (start the run without --resume)")
    try:
        with path.open("rb") as f:
            payload = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by bptvlm tune")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, this client reads {VERSION}")
    names = {f.name for f in fields(Checkpoint)}
    return Checkpoint(**{k: v for k, v in payload.items() if k in names})
