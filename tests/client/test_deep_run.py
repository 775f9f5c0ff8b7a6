"""Deep prompts through the real app (tiny-random CLIP in-process): every schedule spends exactly its
budget, and a run killed mid-way resumes to the uninterrupted run's result."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bptvlm.client.api import ClipClient
from bptvlm.client.artifacts import load_prompts
from bptvlm.client.checkpoint import CHECKPOINT_FILE, load_checkpoint
from bptvlm.client.config import TuneConfig
from bptvlm.client.evaluate import evaluate_saved
from bptvlm.client.run import resume_tuning, run_tuning
from bptvlm.client.strategies import LayerCycle, layer_budgets
from bptvlm.server.app import create_app
from bptvlm.server.config import Settings

from .test_client_resume import APP, DyingClient, _data, _Killed, _same_run

CASES = {
    "cycle": {"depth": "all", "deep_schedule": "cycle"},
    "joint": {"depth": "all", "deep_schedule": "joint"},
    "cycle-added": {"depth": "all", "deep_schedule": "cycle", "deep_prompt_mode": "add"},
    "shared-subspace": {"subspace": "shared", "d_vision": APP["d_text"]},
    "cycle-mixed-context": {"depth": "2", "deep_schedule": "cycle", "text_context": "mixed", "variant": "joint"},
}


@pytest.fixture(scope="module")
def app_http() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model="tiny-random", device="cpu"))) as http:
        yield http


@pytest.mark.parametrize("case", list(CASES))
def test_each_schedule_spends_its_budget_and_resumes_after_a_kill_to_the_same_result(
    app_http: TestClient, tmp_path: Path, case: str
) -> None:
    client = ClipClient("http://testserver", http=app_http)
    data = _data(size=client.prompt_limits().image_size)
    config = TuneConfig(optimizer="DiagonalCMA", budget=27, popsize=5, **{**APP, **CASES[case]})  # 6 generations, the last of 2
    whole = run_tuning(client, data, config, tmp_path / "whole", progress=False)
    with pytest.raises(_Killed):
        run_tuning(DyingClient("http://testserver", http=app_http, die_at=4), data, config, tmp_path / "resumed",
                   progress=False)
    resumed = resume_tuning(ClipClient("http://testserver", http=app_http), data, tmp_path / "resumed", progress=False)

    assert resumed["train_queries"] == whole["train_queries"] == 27
    assert resumed["server_usage"]["candidates"] == whole["server_usage"]["candidates"] == 27 + whole["eval_queries"]
    _same_run(tmp_path / "whole", tmp_path / "resumed")
    meta = load_prompts(tmp_path / "whole" / "prompts.safetensors").meta
    applied = evaluate_saved(client, tmp_path / "whole" / "prompts.safetensors", data)  # bptvlm eval: same prompt, same mode
    assert applied["test_accuracy"] == whole["test_accuracy"]
    strategy = pickle.loads(load_checkpoint(tmp_path / "whole" / CHECKPOINT_FILE).strategy)
    if CASES[case].get("deep_schedule") == "cycle":
        assert isinstance(strategy, LayerCycle) and strategy.spent == layer_budgets(27, 5, 2) == [15, 12]
        assert meta["text_depth"] == meta["vision_depth"] == 2
    else:
        assert not isinstance(strategy, LayerCycle)
        assert meta["subspace"] == ("shared" if case == "shared-subspace" else "separate")
