"""What a tuning run leaves on disk: ``prompts.safetensors``, ``summary.json``, ``progress.jsonl``."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

PROMPTS_FILE = "prompts.safetensors"
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.jsonl"
_META_KEY = "bptvlm"
logger = logging.getLogger(__name__)


@dataclass
class SavedPrompts:
    """Tuned prompt tensors (a population of one) and how they were made.

    tensors: ``text_context`` float32 [1, n_ctx_text, D_t] (per class: [1, C, n_ctx_text, D_t]) and/or
             ``visual_prompt`` float32 [1, n_ctx_vision, D_v]; ``z`` float32 [1, d] (the client-side
             search point).
    meta:    model, template, context_init, class_names, class_texts, n_ctx, seed, loss, ...
    """

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]

    def prompts(self) -> dict[str, np.ndarray]:
        """The tensors that go on the wire (everything but ``z``)."""
        return {k: v for k, v in self.tensors.items() if k != "z"}


def save_prompts(path: Path, saved: SavedPrompts) -> None:
    """Write tensors with ``meta`` as JSON under the ``bptvlm`` key of the safetensors metadata."""
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in saved.tensors.items()}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(saved.meta)})


def load_prompts(path: str | Path) -> SavedPrompts:
    """Read a file written by ``save_prompts``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the prompts file, {path / PROMPTS_FILE}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type (and OSError) for anything unreadable
        raise ValueError(f"{path} is not a prompts file written by bptvlm tune (a safetensors file, "
                         f"{PROMPTS_FILE} in the run folder): {str(exc).splitlines()[0][:120]}") from None
    if _META_KEY not in metadata:
        raise ValueError(f"{path} was not written by bptvlm tune (no '{_META_KEY}' metadata)")
    return SavedPrompts(tensors=load_file(str(path)), meta=json.loads(metadata[_META_KEY]))


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, write: Callable[[BinaryIO], object] | str | bytes) -> None:
    """Write ``write`` (text, bytes, or a function of the open file) to a temporary file beside
    ``path``, fsync it and rename it over ``path``: readers (and a crash) see the old file or the
    whole new one, never a part."""
    if isinstance(write, (str, bytes)):
        payload = write.encode("utf-8") if isinstance(write, str) else write
        write = lambda f: f.write(payload)  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


class ProgressLog:
    """One JSON line per generation, flushed as written, so a killed run keeps its history; also kept
    in memory (``records``). Without a path (a Python-API run without ``out``) memory only.

    A resumed run keeps the file's first ``keep`` lines (the checkpointed generations): lines written
    after the last checkpoint, whose generations run again, are dropped instead of duplicated.
    """

    def __init__(self, path: Path | None, keep: int = 0) -> None:
        self.records: list[dict[str, Any]] = []
        if path is not None and keep and path.is_file():
            lines = path.read_text().splitlines()[:keep]
            self.records = [json.loads(line) for line in lines]
        if len(self.records) < keep:
            logger.warning("%s holds %d progress lines, the checkpoint counts %d: the history starts incomplete",
                           path, len(self.records), keep)
        self._file = path.open("w") if path is not None else None
        for record in self.records:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record)) + "\n")
            self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
