"""The paper's grid (``bptvlm bench --grid paper``): its dry run, per-task budgets, and a cell at the
paper's sizes (500 + 500 dims, popsize 30, 3,600 queries) on a generated CoOp-layout set through a real
server process (tiny-random CLIP), under base2new, with the paper's numbers beside ours in report.md."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bptvlm.bench.grid import load_grid_file, make_grid
from bptvlm.bench.paper import BUDGETS, REPORTED
from bptvlm.cli import main
from bptvlm.launch import local_server

from .layout import write_layout


def test_the_paper_grid_file() -> None:
    grid = make_grid(load_grid_file("paper"))
    assert list(grid.tasks) == list(REPORTED) and grid.task_budgets == BUDGETS
    assert (grid.popsize, grid.shots, grid.seeds, grid.intrinsic_dims, grid.variants) == (30, 16, (1, 2, 3), (500,), ("joint",))
    assert grid.budgets_for("DTD") == (3600, 36000) and grid.budgets_for("OxfordPets") == (3600,)
    assert (grid.depths, grid.deep_schedules) == (("1", "all"), ("cycle",))  # shallow and the paper's deep variant
    config = next(c for c in grid.cells() if c.task == "ImageNet").tune_config(grid)
    assert (config.budget, config.optimizer, config.d_text, config.d_vision, config.sigma) == (14400, "CMA", 500, 500, 1.0)
    # a task's own budget is part of its cells' keys; a grid without task_budgets keys as before
    other = make_grid({**load_grid_file("paper"), "task_budgets": {**BUDGETS, "DTD": 100}})
    dtd = [c for c in grid.cells() if c.task == "DTD"][0]
    assert dtd.key(grid, "m") != dtd.key(other, "m")
    pets = [c for c in grid.cells() if c.task == "OxfordPets"][0]
    assert pets.key(grid, "m") == pets.key(other, "m")


def test_the_paper_grid_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_layout("OxfordPets", tmp_path)
    assert main(["bench", "--grid", "paper", "--dry-run", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("54 black-box cells, 27 baseline cells (zero-shot); protocol all")
    assert "| DTD | CMA | joint | 2 | 500 | 3600, 36000 |" in out
    assert "| DTD | CMA | joint deep=all cycle | 2 | 500 | 3600, 36000 |" in out
    assert f"total training queries: {2 * 3 * sum(BUDGETS.values())} " in out  # 928,800: shallow and deep, 3 seeds
    assert "data OxfordPets: found" in out
    assert "data DTD: MISSING: DTD: " + str(tmp_path / "dtd") + " not found" in out


@pytest.mark.slow
def test_a_paper_size_cell_base2new_through_a_server(tmp_path: Path) -> None:
    write_layout("Caltech101", tmp_path / "DATA")  # 4 classes: 2 base, 2 new
    out = tmp_path / "bench"
    with local_server("tiny-random", timeout=120) as url:
        # DiagonalCMA: pycma's full CMA-ES at d = 1000 is most of a 3,600-query run's client CPU on this machine
        # (its paper run is tests/client/test_client_e2e.py's); the grid's shapes, budget and protocol are the paper's
        cmd = [sys.executable, "-m", "bptvlm.cli", "bench", "--grid", "paper", "--endpoint", url, "--tasks", "Caltech101",
               "--optimizers", "DiagonalCMA", "--seeds", "1", "--shots", "2", "--val-shots", "1", "--protocol", "base2new",
               "--depths", "1", "--data-root", str(tmp_path / "DATA"), "--out", str(out), "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=300, capture_output=True)  # shallow: deep runs are tests/bench's
    rows = list(csv.DictReader((out / "results.csv").open()))
    bb = [r for r in rows if r["kind"] == "blackbox"]
    assert [(r["budget"], r["queries"], r["d"], r["variant"]) for r in bb] == [("3600", "3600", "500", "joint")]
    for r in rows:
        b, n = float(r["base_accuracy"]), float(r["new_accuracy"])
        assert float(r["harmonic_mean"]) == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
        assert float(r["base_accuracy"]) == float(r["test_accuracy"])
    report = (out / "report.md").read_text()
    assert "| data set | paper shallow | paper deep | budget | DiagonalCMA joint | zero-shot |" in report
    assert "| Caltech101 | 94.16 | 93.39 | 3600 |" in report and "## Base-to-new (%)" in report
