"""Finished cells on disk: ``OUT/cells/<key>.json``, each written atomically once complete, and the
tables built from them (``results.jsonl``, ``results.csv``).

A cell file exists only for a finished cell (temporary file + ``os.replace``), so a rerun skips it and
an interrupt loses at most the cell in flight.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bptvlm.client.artifacts import write_atomic

from .grid import DEEP_DEFAULTS, variant_label

CELLS_DIR = "cells"
COLUMNS = (
    "task", "optimizer", "variant", "seed", "budget", "queries", "val_accuracy", "test_accuracy", "wall_s",
    "requests", "image_forwards", "price", "eval_queries", "eval_requests", "eval_image_forwards", "eval_wall_s",
    "kind", "d", "n_ctx_text", "n_ctx_vision", "val_loss", "train_loss", "selected", "model",
    "base_accuracy", "new_accuracy", "harmonic_mean",
    "feedback", "output_noise", "output_decimals",
)  # fmt: skip


class CellStore:
    """The cell files under ``out/cells``."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out) / CELLS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path(key).read_text())
        return data

    def save(self, key: str, record: dict[str, Any]) -> None:
        write_atomic(self.path(key), json.dumps(record, indent=1, sort_keys=True) + "\n")


def flat_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (cell, checkpoint budget) with the cell's fields in front."""
    rows = []
    for rec in records:
        cell = rec["cell"]
        degraded = {"feedback": cell.get("feedback", ""), "output_noise": cell.get("output_noise", 0.0),
                    "output_decimals": cell.get("output_decimals", -1)}
        suffix = "".join([f" feedback={degraded['feedback']}"] * bool(degraded["feedback"])
                         + [f" noise={degraded['output_noise']:g}"] * (degraded["output_noise"] > 0)
                         + [f" decimals={degraded['output_decimals']}"] * (degraded["output_decimals"] >= 0))
        head = {"task": cell["task"], "optimizer": cell["method"] + suffix, "variant": variant_label(cell),
                "seed": cell["seed"], "kind": cell["kind"], "d": cell["d"], "n_ctx_text": cell["n_ctx_text"],
                "n_ctx_vision": cell["n_ctx_vision"], "model": rec.get("model", ""), **degraded,
                **{k: cell.get(k, v) for k, v in DEEP_DEFAULTS.items()}}  # fmt: skip
        rows += [{**head, **row} for row in rec["rows"]]
    return rows


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """results.jsonl (every field) and results.csv (``COLUMNS``), both atomically."""
    write_atomic(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    write_atomic(out / "results.csv", buf.getvalue())
