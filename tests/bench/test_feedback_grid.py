"""Feedback and degradations as bench grid axes: cells, keys, the gain table, and one cell run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bptvlm.bench.gains import gain_table
from bptvlm.bench.grid import Grid, load_grid_file, make_grid
from bptvlm.bench.runner import run_blackbox
from bptvlm.bench.store import flat_rows
from bptvlm.client.api import ClipClient
from bptvlm.data import load_data
from bptvlm.server.app import create_app
from bptvlm.server.config import Settings

GRIDS = Path(__file__).parents[2] / "bptvlm" / "bench" / "grids"


def test_the_axes_multiply_the_cells_and_reach_the_tune_config() -> None:
    grid = make_grid({"tasks": "shape", "budgets": "20", "popsize": 10, "feedbacks": "label,topk:3,auto",
                      "output_noises": "0,0.5", "output_decimals": "-1,2"})
    cells = grid.cells()
    assert len(cells) == 3 * 2 * 2
    config = next(c for c in cells if c.feedback == "label" and c.output_noise == 0.5 and c.output_decimals == 2
                  ).tune_config(grid)
    assert (config.feedback, config.output_noise, config.output_decimals) == ("label", 0.5, 2)
    auto = next(c for c in cells if not c.feedback and not c.output_noise and c.output_decimals < 0)
    assert auto.tune_config(grid).feedback is None and auto.degradation() == ""
    with pytest.raises(ValueError, match="feedback must be one of"):
        make_grid({"tasks": "shape", "feedbacks": "hard"})


def test_cells_without_the_new_axes_keep_their_keys() -> None:
    grid = Grid(tasks=("shape",), budgets=(20,), popsize=10)
    # the key this cell had before feedback and degradation axes existed (cached cells stay valid)
    assert [c.key(grid, "m") for c in grid.cells()] == ["shape__DiagonalCMA__text__s0__d500__t0v0__691052338f"]
    degraded = Grid(tasks=("shape",), budgets=(20,), popsize=10, feedbacks=("label",), output_noises=(0.5,))
    assert degraded.cells()[0].key(degraded, "m").startswith("shape__DiagonalCMA__text__s0__d500__t0v0__feedbacklabel_noise0.5__")


def test_the_shipped_feedback_grid_parses() -> None:
    grid = make_grid(load_grid_file(GRIDS / "feedback.toml"))
    assert set(grid.feedbacks) == {"logits", "probs", "loss", "topk:3", "label"} and grid.max_budget == 2000


def _rows(method: str, feedback: str, accs: dict[str, float], budget: int = 100) -> list[dict]:
    return [{"kind": "blackbox", "optimizer": method, "variant": "text", "task": t, "seed": 0, "budget": budget,
             "test_accuracy": a, "feedback": feedback, "output_noise": 0.0, "output_decimals": -1} for t, a in accs.items()]


def test_the_gain_table_reports_the_fraction_of_the_logits_gain() -> None:
    zero = [{"kind": "api", "optimizer": "zero-shot", "variant": "-", "task": t, "seed": 0, "budget": 0,
             "test_accuracy": 0.2} for t in ("a", "b")]
    rows = zero + _rows("CMA feedback=logits", "logits", {"a": 0.6, "b": 0.8}) \
        + _rows("CMA feedback=label", "label", {"a": 0.5, "b": 0.5})
    table = gain_table(rows, [100])
    assert table is not None
    assert "| CMA feedback=label | text | 0.500 (60%) |" in table  # (0.5 - 0.2) / (0.7 - 0.2)
    assert "| CMA feedback=logits | text | 0.700 (100%) |" in table
    assert gain_table(zero + _rows("CMA", "", {"a": 0.5}), [100]) is None  # nothing varied: no section


def test_a_label_feedback_cell_with_noise_runs_through_the_api() -> None:
    grid = make_grid({"tasks": "shape", "budgets": "10,20", "popsize": 10, "intrinsic_dims": "20", "shots": 2,
                      "val_shots": 1, "test_per_class": 3, "feedbacks": "label", "output_noises": "0.3",
                      "output_decimals": "2", "baselines": "none"})
    cell = grid.cells()[0]
    with TestClient(create_app(Settings(model="tiny-random", device="cpu", ready_probe_s=0))) as http:
        client = ClipClient("http://testserver", http=http)
        limits = client.prompt_limits()
        data = load_data("shape", seed=0, shots=2, val_shots=1, test_per_class=3, image_size=limits.image_size)
        rows = run_blackbox(client, limits, data, cell, grid)
    assert [r["queries"] for r in rows] == [10, 20]
    assert all(0.0 <= r["train_loss"] <= 1.0 for r in rows)  # error rates, not cross-entropies
    flat = flat_rows([{"cell": cell.__dict__, "rows": rows}])
    assert flat[0]["optimizer"] == "DiagonalCMA feedback=label noise=0.3 decimals=2" and flat[0]["feedback"] == "label"
