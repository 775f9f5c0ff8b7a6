"""``bench`` and ``tune`` are the same loop: the same cell gives the same numbers."""

from __future__ import annotations

import numpy as np

from bptvlm.bench.grid import Grid
from bptvlm.bench.runner import run_blackbox
from bptvlm.client.api import ClipClient
from bptvlm.client.data import FewShotData
from bptvlm.client.run import run_tuning, start

from .conftest import LIMITS, FakeServer


def _data() -> FewShotData:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 2

    return FewShotData(["cat", "dog"], *split(6), *split(4), *split(4))


def test_bench_cell_and_tune_run_agree(client: ClipClient, fake_server: FakeServer) -> None:
    grid = Grid(tasks=("fake",), preset="paper", optimizers=("DiagonalCMA",), budgets=(25, 47), variants=("joint",),
                intrinsic_dims=(8,), n_ctx_text=(2,), n_ctx_vision=(2,), popsize=10)  # fmt: skip
    (cell,) = grid.cells()
    rows = run_blackbox(client, LIMITS, _data(), cell, grid)
    summary = run_tuning(client, _data(), cell.tune_config(grid), None, progress=False)
    last = rows[-1]
    assert [r["budget"] for r in rows] == [25, 47] and last["queries"] == summary["train_queries"] == 47
    assert last["train_loss"] == summary["best_train_loss"]
    assert last["selected"] == summary["selected"] and last["test_accuracy"] == summary["test_accuracy"]
    assert last["val_accuracy"] == summary[f"val_accuracy_{summary['selected']}"]


def test_python_api_run_without_files_returns_prompts_and_history(client: ClipClient, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from bptvlm.client.config import resolve_config

    monkeypatch.chdir(tmp_path)
    config = resolve_config("paper", budget=30, popsize=10, d_text=8, d_vision=6, n_ctx_text=2, n_ctx_vision=2)
    result = start(client, _data(), config, None, progress=False)
    assert [r["generation"] for r in result.history] == [0, 1, 2] and result.history[-1]["queries"] == 30
    assert result.summary["config"]["budget"] == 30 and result.summary["strategy"] == "CMA -> ParametrizedCMA(popsize=10)"
    if result.summary["selected"] == "template":
        assert result.prompts == {}
    else:
        assert result.prompts["text_context"].shape == (1, 2, LIMITS.text_width)
        assert result.prompts["visual_prompt"].shape == (1, 2, LIMITS.vision_width)
    assert not list(tmp_path.iterdir())
