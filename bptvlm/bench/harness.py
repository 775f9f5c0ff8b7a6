"""Run a benchmark grid against a server: skip finished cells, run the rest, write the outputs.

Baseline cells run first (cheap), then the black-box cells. Each finished cell is one file written
atomically (store.py); the tables, report and plots are rebuilt from the cell files of this grid after
every run, also after Ctrl-C (then with the cells finished so far).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bptvlm.client.api import ClipClient
from bptvlm.client.artifacts import write_atomic
from bptvlm.client.config import task_template
from bptvlm.client.data import TaskLike
from bptvlm.client.deep import tower_depths
from bptvlm.client.projection import text_context_length, visual_prompt_length
from bptvlm.data import load_data

from .gains import gain_table
from .grid import WHITEBOX_BASELINES, Cell, Grid
from .report import write_plots, write_report
from .runner import run_api_baseline, run_blackbox
from .store import CellStore, flat_rows, write_tables

logger = logging.getLogger(__name__)


@dataclass
class BenchRun:
    """Where and how to run a grid."""

    grid: Grid
    out: Path
    endpoint: str
    api_key: str | None = None
    model_name: str = "clip"
    progress: bool = True
    command: str = ""
    overwrite: bool = False


@dataclass
class Outcome:
    """What a run did: cells run now, cells skipped as finished, cells left (interrupted)."""

    ran: int
    skipped: int
    left: int
    rows: list[dict[str, Any]]
    wall_s: float


def _whitebox_model(spec: str, served: Any) -> Any:
    """The served model in-process (``PromptedCLIP``); ``ValueError`` unless it is the same model."""
    from bptvlm.server.loading import load_model
    from bptvlm.server.model import PromptedCLIP

    clip = PromptedCLIP(load_model(spec))
    if clip.limits != served:
        raise ValueError(
            f"--whitebox-model {spec} is not the served model (its published statistics differ: "
            f"{clip.limits.model_dump()} vs {served.model_dump()}); white-box baselines need the same weights"
        )
    return clip


REPORT_FILES = ("grid.json", "report.md", "results.csv", "results.jsonl")


def claim_out(out: Path, grid: Grid, overwrite: bool) -> None:
    """Refuse an ``out`` that holds another grid's benchmark (or anything else) unless ``overwrite``;
    then its report, tables and plots go (the cell files stay: each is keyed by all that shapes it)."""
    import json

    saved = out / "grid.json"
    if saved.is_file():
        old = json.loads(saved.read_text()).get("grid", {})
        new = json.loads(_json(grid.to_dict()))
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ and not overwrite:
            raise ValueError(f"--out {out} holds a benchmark of another grid (it differs in {', '.join(differ)}): rerun "
                             "with that grid to resume it, --overwrite to replace its report, or choose another --out")
    elif out.is_dir() and any(p.name != "cells" for p in out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty and holds no benchmark: choose another --out, or --overwrite")
    if overwrite and out.is_dir():
        for path in [*(out / name for name in REPORT_FILES), *out.glob("plot_*.png")]:
            path.unlink(missing_ok=True)


def run_grid(run: BenchRun) -> Outcome:
    """Run every unfinished cell of ``run.grid``; write results.csv, results.jsonl, report.md, plots."""
    start = time.perf_counter()
    claim_out(run.out, run.grid, run.overwrite)
    grid, store = run.grid, CellStore(run.out)
    with ClipClient(run.endpoint, api_key=run.api_key, model=run.model_name, max_retries=None, retry_for=120.0, max_backoff=10.0) as client:
        client.check_server(refused_for=5.0)
        client.wait_until_ready(60.0)
        metadata = client.model_metadata()
        model_id = str(metadata.parameters.get("model_id", metadata.name))
        limits = client.prompt_limits(metadata)
        clip: Any = None  # loaded when the first white-box cell runs
        if not grid.whitebox_model and any(b in WHITEBOX_BASELINES for b in grid.baselines):
            logger.warning("no --whitebox-model: the white-box baselines (CoOp, same-shape, linear probe) are skipped")
        cells = grid.baseline_cells(bool(grid.whitebox_model)) + grid.cells()
        keys = [c.key(grid, model_id) for c in cells]
        todo = [(c, k) for c, k in zip(cells, keys) if not store.done(k)]
        write_atomic(run.out / "grid.json", _json({"grid": grid.to_dict(), "model": model_id, "endpoint": run.endpoint,
                                                   "command": run.command}))
        logger.info("%d cells: %d finished earlier, %d to run (model %s)", len(cells), len(cells) - len(todo), len(todo), model_id)
        ran, interrupted = 0, False
        data_cache: dict[tuple[str, int], tuple[TaskLike, TaskLike | None]] = {}
        show = run.progress and sys.stderr.isatty()
        cell_bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="cells", disable=not show, position=0)
        query_bar = tqdm(total=sum(grid.budgets_for(c.task)[-1] for c, _ in todo if c.kind == "blackbox"), unit="query",
                         desc="queries", disable=not show, position=1)
        try:
            for cell, key in todo:
                cell_bar.set_postfix_str(f"{cell.task} {cell.method} {cell.variant} s{cell.seed}")
                if (cell.task, cell.seed) not in data_cache:
                    data_cache[(cell.task, cell.seed)] = _load(grid, cell, limits.image_size)
                data, new = data_cache[(cell.task, cell.seed)]
                if cell.kind == "white-box" and clip is None:
                    assert grid.whitebox_model
                    clip = _whitebox_model(grid.whitebox_model, limits)
                t0 = time.perf_counter()
                rows = _run_cell(client, limits, clip, data, cell, grid, query_bar, new)
                record = {"cell": asdict(cell), "model": model_id, "rows": rows, "cell_wall_s": round(time.perf_counter() - t0, 3),
                          "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
                store.save(key, record)
                ran += 1
                cell_bar.update(1)
                last = rows[-1]
                logger.info("%s %s %s seed %d: test %.3f (val %.3f) at %d queries", cell.task,
                            cell.method + cell.degradation(), cell.variant,
                            cell.seed, last["test_accuracy"], last["val_accuracy"], last["queries"])  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("interrupted: the cell in flight is lost; rerun the same command to resume")
        finally:
            query_bar.close()
            cell_bar.close()
    records = [store.load(k) for k in keys if store.done(k)]
    rows = flat_rows(records)
    wall = time.perf_counter() - start
    _write_outputs(run, rows, model_id, records, len(cells), wall)
    left = len(cells) - len(records)
    if interrupted:
        raise KeyboardInterrupt
    return Outcome(ran=ran, skipped=len(cells) - len(todo), left=left, rows=rows, wall_s=wall)


def _load(grid: Grid, cell: Cell, image_size: int) -> tuple[TaskLike, TaskLike | None]:
    """A cell's data (base2new: the base classes) and, for base2new, the new classes' test split."""
    data = load_data(cell.task, seed=cell.seed, shots=grid.shots, val_shots=grid.val_shots, test_per_class=grid.test_per_class,
                     image_size=image_size, data_root=grid.data_root,
                     dataset_test_per_class=grid.dataset_test_per_class or None)  # fmt: skip
    if grid.protocol != "base2new":
        return data, None
    from bptvlm.client.base2new import split_base_new

    return split_base_new(data)


def _run_cell(client: ClipClient, limits: Any, clip: Any, data: TaskLike, cell: Cell, grid: Grid, bar: Any,
              new: TaskLike | None = None) -> list[dict[str, Any]]:
    if cell.kind == "blackbox":
        return run_blackbox(client, limits, data, cell, grid, bar, new)
    if cell.kind == "api":
        return run_api_baseline(client, data, cell, grid, new)
    from .sameshape import PromptShape, run_same_shape
    from .whitebox import run_coop, run_linear_probe

    if cell.method in ("coop", "same-shape"):
        template = task_template(cell.tune_config(grid), data)
        n_ctx = text_context_length(clip, cell.n_ctx_text or None, template)  # the black-box default, counted in-process
    if cell.method == "coop":
        result = run_coop(clip, data, template, n_ctx, steps=grid.coop_steps, lr=grid.coop_lr, seed=cell.seed)
    elif cell.method == "same-shape":
        placement = str(grid.visual_prompt_position)
        shape = PromptShape(cell.variant, str(grid.text_context), n_ctx,
                            visual_prompt_length(limits, cell.n_ctx_vision or None, placement), placement,
                            tower_depths(cell.depth, limits))
        result = run_same_shape(clip, data, template, shape, steps=grid.coop_steps, lr=grid.coop_lr, seed=cell.seed)
    else:
        result = run_linear_probe(clip, data, seed=cell.seed)
    zero = {"queries": 0, "requests": 0, "image_forwards": 0, "price": 0.0, "eval_queries": 0, "eval_requests": 0,
            "eval_image_forwards": 0, "eval_wall_s": 0.0}  # fmt: skip
    return [{"budget": 0, **zero, **result}]


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=str) + "\n"


def _write_outputs(run: BenchRun, rows: list[dict[str, Any]], model_id: str, records: list[dict[str, Any]], n_cells: int, wall: float) -> None:
    write_tables(run.out, rows)
    cell_wall = sum(r.get("cell_wall_s", 0.0) for r in records)
    header = "\n".join([
        "# Benchmark report",
        "",
        f"- command: `{run.command or '(library call)'}`",
        f"- model: `{model_id}` at {run.endpoint}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        f"- cells: {len(records)} of {n_cells} finished; summed cell time {cell_wall:.0f} s; this invocation {wall:.0f} s",
        f"- data: {run.grid.shots} training shots and {run.grid.val_shots} validation images per class (from the "
        f"training pool), {run.grid.test_per_class} test images per class (built-in tasks); popsize {run.grid.popsize}",
        f"- price: {run.grid.price_per_1k_image_forwards} per 1k image forwards (simulated)",
    ])
    if rows:
        path = write_report(run.out, rows, header, list(run.grid.all_budgets()))
        gains = gain_table(rows, list(run.grid.all_budgets()))  # only when the grid varies feedback or degradations
        if gains:
            write_atomic(path, path.read_text() + "\n" + gains)
        write_plots(run.out, rows)
