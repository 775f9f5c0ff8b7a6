"""Deep prompts on the client: per-layer projections scaled from the published statistics, the cycle
schedule on the one loop (exact budgets, resumable), the joint schedule and the shared subspace."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bptvlm.client.config import TuneConfig, Template
from bptvlm.client.deep import DeepProjection, tower_depths
from bptvlm.client.loop import run_search
from bptvlm.client.projection import PromptProjection, build_projection
from bptvlm.client.strategies import LayerCycle, StrategySpec, layer_budgets, make_strategy
from bptvlm.shared import protocol as p

from .conftest import LIMITS

DEEP = LIMITS.model_copy(update={"text_layers": 3, "vision_layers": 5, "text_hidden_std": [1.0, 2.0, 4.0],
                                 "vision_hidden_std": [1.0, 0.5, 1.5, 3.0, 6.0]})
TEMPLATE = Template("a photo of a {}.")


class _Tokens:
    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]


def _projection(limits: p.PromptLimits = DEEP, **config) -> PromptProjection | DeepProjection:
    cfg = TuneConfig(**{"d_text": 40, "d_vision": 40, "n_ctx_text": 4, "n_ctx_vision": 2, **config})
    return build_projection(_Tokens(), limits, cfg, TEMPLATE, 3)


def test_depth_one_with_separate_subspaces_is_todays_projection_unchanged() -> None:
    proj = _projection()
    assert type(proj) is PromptProjection
    direct = PromptProjection(DEEP, n_ctx_text=4, n_ctx_vision=2, d_text=40, d_vision=40)
    z = np.random.default_rng(0).normal(size=(3, 80))
    assert all(np.array_equal(proj(z)[k], direct(z)[k]) for k in direct(z))


def test_depth_is_capped_at_each_tower_and_refused_beyond_both() -> None:
    assert tower_depths("all", DEEP) == (3, 5) and tower_depths("4", DEEP) == (3, 4) and tower_depths("1", LIMITS) == (1, 1)
    with pytest.raises(ValueError, match="3 \\(text\\) and 5 \\(vision\\) layers"):
        tower_depths("6", DEEP)
    with pytest.raises(ValueError, match="publishes no per-layer"):
        tower_depths("2", LIMITS)
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="depth must be"):
            TuneConfig(depth=bad)
    assert TuneConfig(depth=3).depth == "3"


def test_cycle_projection_one_block_per_layer_scaled_by_the_layer_stats() -> None:
    proj = _projection(depth="all", text_context="per_class")
    assert isinstance(proj, DeepProjection) and proj.cycle_blocks == (80, 80, 80, 40, 40)
    z = np.random.default_rng(0).normal(size=(2000, proj.dimension)).astype(np.float32)
    out = proj(z)
    assert out[p.TEXT_CONTEXT].shape == (2000, 3, 4, 6) and out[p.TEXT_DEEP_PROMPT].shape == (2000, 2, 4, 6)
    assert out[p.VISUAL_PROMPT].shape == (2000, 2, 5) and out[p.VISUAL_DEEP_PROMPT].shape == (2000, 4, 2, 5)
    # prompt std = hidden std / sigma at every deep layer (z ~ N(0, I)), within sampling error
    np.testing.assert_allclose(out[p.TEXT_DEEP_PROMPT].std(axis=(0, 2, 3)), [2.0, 4.0], rtol=0.15)
    np.testing.assert_allclose(out[p.VISUAL_DEEP_PROMPT].std(axis=(0, 2, 3)), [0.5, 1.5, 3.0, 6.0], rtol=0.15)
    moved = z.copy()
    moved[:, 160:240] += 1.0  # layer 2's block: text deep layer 2 (index 1) and vision deep layer 2
    after = proj(moved)
    assert np.array_equal(after[p.TEXT_CONTEXT], out[p.TEXT_CONTEXT])
    assert np.array_equal(after[p.TEXT_DEEP_PROMPT][:, 0], out[p.TEXT_DEEP_PROMPT][:, 0])
    assert not np.array_equal(after[p.TEXT_DEEP_PROMPT][:, 1], out[p.TEXT_DEEP_PROMPT][:, 1])
    assert np.array_equal(np.delete(after[p.VISUAL_DEEP_PROMPT], 1, axis=1), np.delete(out[p.VISUAL_DEEP_PROMPT], 1, axis=1))


def test_joint_schedule_one_z_for_every_layer_and_the_shared_subspace() -> None:
    joint = _projection(depth="3", deep_schedule="joint")
    assert joint.dimension == 80 and joint.cycle_blocks == ()
    z = np.random.default_rng(1).normal(size=(2, 80)).astype(np.float32)
    assert joint(z)[p.VISUAL_DEEP_PROMPT].shape == (2, 2, 2, 5) and joint(z)[p.TEXT_DEEP_PROMPT].shape == (2, 2, 4, 6)
    shared = _projection(subspace="shared", d_vision=7)  # d_vision follows d_text
    assert isinstance(shared, DeepProjection) and shared.dimension == 40 and shared.d_vision == 40
    one = shared(z[:, :40])
    base = shared.base(np.concatenate([z[:, :40], z[:, :40]], axis=1))
    assert all(np.array_equal(one[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="needs variant 'joint'"):
        TuneConfig(subspace="shared", variant="text")
    with pytest.raises(ValueError, match="'add' appends none"):
        TuneConfig(depth="2", visual_prompt_position="add")


@pytest.mark.parametrize("budget,popsize,layers", [(600, 30, 12), (601, 30, 12), (29, 30, 3), (3600, 30, 7), (95, 10, 4)])
def test_layer_budgets_add_up_without_rounding_loss(budget: int, popsize: int, layers: int) -> None:
    shares = layer_budgets(budget, popsize, layers)
    assert sum(shares) == budget and len(shares) == layers and max(shares) - min(shares) <= popsize


def _quadratic(target: np.ndarray):
    def score(z: np.ndarray, tag: str) -> np.ndarray:
        return ((z - target) ** 2).sum(1)
    return score


def test_cycle_at_the_paper_size_spends_each_layer_its_share_and_varies_one_block_a_generation() -> None:
    blocks, popsize, budget = (1000,) * 12, 30, 3600  # 500 + 500 dims per layer, 12 layers, Caltech101's budget
    target = np.linspace(-1, 1, sum(blocks))
    strategy = make_strategy(StrategySpec("DiagonalCMA", popsize, sum(blocks), budget, 0, blocks))
    assert isinstance(strategy, LayerCycle)
    asked: list[np.ndarray] = []
    score = _quadratic(target)

    def watched(z: np.ndarray, tag: str) -> np.ndarray:
        asked.append(z)
        return score(z, tag)

    state = run_search(watched, strategy, budget=budget, popsize=popsize)
    assert state.spent == budget and strategy.spent == layer_budgets(budget, popsize, 12) == [300] * 12
    for g, z in enumerate(asked):  # generation g moves layer g mod 12's block only
        varying = np.flatnonzero(np.ptp(z, axis=0) > 0)
        layer = g % 12
        assert varying.min() >= 1000 * layer and varying.max() < 1000 * (layer + 1)
    assert state.best_loss < score(asked[0], "").min() - 100  # it learns


def test_a_pickled_cycle_resumes_to_the_same_result() -> None:
    blocks, target = (20, 20, 10), np.linspace(-1, 1, 50)
    spec = StrategySpec("DiagonalCMA", 10, 50, 205, 3, blocks)
    whole = run_search(_quadratic(target), make_strategy(spec), budget=205, popsize=10)
    first = make_strategy(spec)
    half = run_search(_quadratic(target), first, budget=205 // 2 // 10 * 10, popsize=10)
    resumed = pickle.loads(pickle.dumps(first))
    rest = run_search(_quadratic(target), resumed, budget=205, popsize=10, state=half)
    assert rest.spent == whole.spent == 205 and rest.best_loss == whole.best_loss
    assert np.array_equal(rest.best_z, whole.best_z)


def test_eval_of_a_saved_deep_prompt_sends_it_with_its_mode(make_client, fake_server, tmp_path) -> None:
    from bptvlm.client.artifacts import SavedPrompts, save_prompts
    from bptvlm.client.data import FewShotData
    from bptvlm.client.evaluate import evaluate_saved

    rng = np.random.default_rng(0)
    tensors = {p.TEXT_CONTEXT: np.zeros((1, 2, 6), np.float32), p.TEXT_DEEP_PROMPT: np.ones((1, 2, 2, 6), np.float32)}
    meta = {"model": "fake-clip", "template": "a photo of a {}.", "class_names": ["cat", "dog"], "deep_prompt_mode": "add"}
    save_prompts(tmp_path / "p.safetensors", SavedPrompts(tensors=tensors, meta=meta))
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    data = FewShotData(["cat", "dog"], images, np.array([0, 1, 0, 1]), images, np.array([0, 1, 0, 1]))
    evaluate_saved(make_client(), tmp_path / "p.safetensors", data)
    prompted = [(req, arrays) for req, arrays in fake_server.infer_bodies if p.TEXT_DEEP_PROMPT in arrays]
    assert prompted and all(req.parameters[p.PARAM_DEEP_PROMPT_MODE] == "add" for req, _ in prompted)
    np.testing.assert_array_equal(prompted[0][1][p.TEXT_DEEP_PROMPT], tensors[p.TEXT_DEEP_PROMPT])
