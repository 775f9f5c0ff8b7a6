"""The strategy layer and the one loop at the paper's sizes: every optimizer family, popsize 10 and 30,
500 + 500 dimensions, a 3,000-query budget, against a deterministic objective (no server)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bptvlm.client.loop import LoopCallback, SearchState, run_search
from bptvlm.client.strategies import BatchedSPSA, StrategySpec, check_strategy_name, make_strategy

D = 1000  # the paper's 500 text + 500 vision dimensions
TARGET = np.linspace(-1.0, 1.0, D)


class Counting:
    """Wraps a strategy: records the size of every ask and every tell."""

    def __init__(self, inner: object) -> None:
        self.inner, self.asked, self.told = inner, [], []

    def ask(self, n: int) -> np.ndarray:
        self.asked.append(n)
        return self.inner.ask(n)  # type: ignore[attr-defined]

    def tell(self, z: np.ndarray, losses: np.ndarray) -> None:
        self.told.append(len(losses))
        self.inner.tell(z, losses)  # type: ignore[attr-defined]

    def recommend(self) -> np.ndarray:
        return self.inner.recommend()  # type: ignore[attr-defined]


def _sphere(z: np.ndarray, tag: str) -> np.ndarray:
    return ((z - TARGET) ** 2).sum(1)


# the full-covariance CMA-ES at d = 1000 costs pycma 20-50 s per run on 2 cores
SLOW = {"CMA", "NGOpt"}


@pytest.mark.parametrize("popsize", [10, 30])
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
     for n in ["CMA", "DiagonalCMA", "TBPSA", "OnePlusOne", "NGOpt", "SPSA", "PSO", "TwoPointsDE"]],
)
def test_every_family_runs_the_paper_size_to_the_budget(name: str, popsize: int) -> None:
    budget = 3000
    strategy = Counting(make_strategy(StrategySpec(name, popsize, D, budget, seed=0)))
    state = run_search(_sphere, strategy, budget=budget, popsize=popsize)  # type: ignore[arg-type]
    assert state.spent == budget == sum(strategy.told)
    assert strategy.asked == strategy.told == [popsize] * (budget // popsize)  # whole generations, told whole
    assert np.isfinite(state.best_loss) and state.best_z is not None and state.best_z.shape == (D,)
    population = getattr(strategy.inner, "population", None)
    assert population in (None, popsize)  # pycma's own generation is the request


def test_cma_is_the_standard_cma_es_with_the_requested_population() -> None:
    strategy = make_strategy(StrategySpec("CMA", 30, D, 3600, seed=0))
    assert strategy.describe() == "CMA -> ParametrizedCMA(popsize=30)" and strategy.population == 30
    ngopt = make_strategy(StrategySpec("NGOpt", 30, D, 3600, seed=0))
    assert ngopt.describe().startswith("NGOpt -> ") and ngopt.population == 30  # resolved to a CMA, pinned


def test_ragged_budget_asks_the_last_generation_short() -> None:
    strategy = Counting(make_strategy(StrategySpec("DiagonalCMA", 30, 50, 100, seed=0)))
    state = run_search(_small, strategy, budget=100, popsize=30)  # type: ignore[arg-type]
    assert state.spent == 100 and strategy.asked == [30, 30, 30, 10]


def _small(z: np.ndarray, tag: str) -> np.ndarray:
    return (z**2).sum(1) + 1.0


def test_marks_inside_a_generation_split_its_scoring_and_fire_before_the_tell() -> None:
    calls: list[tuple[str, int]] = []
    seen: list[tuple[int, int]] = []

    def score(z: np.ndarray, tag: str) -> np.ndarray:
        calls.append((tag, len(z)))
        return _small(z, tag)

    class Marks(LoopCallback):
        def on_mark(self, budget: int, state: SearchState) -> None:
            seen.append((budget, state.generations))

    strategy = make_strategy(StrategySpec("OnePlusOne", 10, 8, 30, seed=0))
    run_search(score, strategy, budget=30, popsize=10, callbacks=[Marks()], marks=[5, 20, 30])
    assert calls == [("g0", 5), ("g0-5", 5), ("g1", 10), ("g2", 10)]
    assert seen == [(5, 0), (20, 2), (30, 3)]  # 5: inside generation 0, before its tell; the others after


@pytest.mark.parametrize("name", ["DiagonalCMA", "SPSA", "TBPSA"])
def test_a_pickled_strategy_continues_like_the_original(name: str) -> None:
    a = make_strategy(StrategySpec(name, 10, 40, 200, seed=3))
    run_search(_small, a, budget=100, popsize=10)
    b = pickle.loads(pickle.dumps(a))
    za, zb = a.ask(10), b.ask(10)
    np.testing.assert_array_equal(za, zb)


def test_spsa_estimates_the_gradient_from_antithetic_pairs() -> None:
    spsa = BatchedSPSA(StrategySpec("SPSA", 30, 20, 3000, seed=0), max_grad_norm=None)
    z = spsa.ask(31)  # 15 pairs and the centre
    assert z.shape == (31, 20)
    np.testing.assert_allclose(z[:15] + z[15:30], 0.0, atol=1e-6)  # x = 0: +/- the same perturbation
    np.testing.assert_array_equal(z[30], 0.0)
    spsa.tell(z, ((z - 1.0) ** 2).sum(1))
    x = spsa.recommend()
    assert float(((x - 1.0) ** 2).sum()) < 20.0  # one step downhill from f(0) = 20


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StrategySpec("CMAA", 30, 10, 100, 0), "unknown optimizer 'CMAA'; did you mean CMA"),
        (StrategySpec("Powell", 30, 10, 100, 0), "evaluates one candidate at a time.*use --popsize 1, or a population"),
        (StrategySpec("SPSA", 1, 10, 100, 0), "SPSA needs popsize >= 2"),
        (StrategySpec("CMA", 1, 10, 100, 0), "needs popsize >= 2"),
    ],
    ids=["unknown", "sequential", "spsa-one", "cma-one"],
)
def test_refusals_say_what_to_use_instead(spec: StrategySpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_strategy(spec)


def test_our_names_come_first() -> None:
    check_strategy_name("SPSA")  # ours, although nevergrad's own SPSA refuses populations
    assert isinstance(make_strategy(StrategySpec("SPSA", 10, 5, 100, 0)), BatchedSPSA)
