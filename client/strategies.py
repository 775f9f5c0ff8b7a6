"""Search strategies: what one generation is, owned in one place.

A strategy proposes a whole generation ``z [n, d]`` (``ask``), is told that generation's losses
``[n]`` in one call (``tell``) and recommends a point ``[d]``. The tuning loop asks exactly one
generation per request and tells it whole, so a strategy's own population must be the request's:

- nevergrad optimizers (``NevergradStrategy``) get their population pinned to ``popsize`` on every
  family that has one (``popsize``/``initial_popsize``); ``CMA`` is pycma's standard CMA-ES with that
  population (``ParametrizedCMA(popsize=P)``, the paper's); selector optimizers (``NGOpt``, the
  registry's ``CMA``) are resolved to the optimizer they would choose and that one is pinned. An
  optimizer that evaluates one candidate at a time is refused for ``popsize > 1``, with what to use.
- ``SPSA`` is ours (``BatchedSPSA``): P/2 antithetic perturbation pairs per request and one averaged
  gradient estimate per generation (ZIP's estimator), optionally clipped.
- ``LayerCycle`` (deep prompts, the paper's schedule): z is one block per layer, each block with its own
  strategy of the named kind; generation ``g`` is asked of layer ``g mod K``, the other blocks held at the
  best point seen. Built by ``make_strategy`` when the spec has ``blocks``.

Strategies are found by name in ``STRATEGIES`` (ours) and then nevergrad's registry; an unknown name
gets close-name suggestions from both.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import nevergrad as ng
import numpy as np
from nevergrad.optimization.base import ConfiguredOptimizer

logger = logging.getLogger(__name__)

# pycma's step-size adaptation (TPA) warns on every generation where nevergrad's mirrored samples look
# inconsistent to it; the search is unaffected and the warning drowns the progress output.
warnings.filterwarnings("ignore", message="TPA: apparent inconsistency", category=UserWarning)

POPULATION_KEYS = ("popsize", "initial_popsize")  # nevergrad's names for a family's population


class Strategy(Protocol):
    """One generation at a time: ``ask`` -> score -> ``tell``; picklable (the checkpoint holds it)."""

    name: str
    dimension: int

    def ask(self, n: int) -> np.ndarray:
        """The next generation, float32 ``[n, dimension]`` (``n`` <= popsize; less only at the budget's end)."""
        ...

    def tell(self, z: np.ndarray, losses: np.ndarray) -> None:
        """The losses ``[n]`` of the generation ``z [n, d]`` that ``ask`` returned last."""
        ...

    def recommend(self) -> np.ndarray:
        """The strategy's own recommendation, float32 ``[dimension]``."""
        ...

    def describe(self) -> str:
        """What runs, resolved (e.g. ``NGOpt -> ParametrizedCMA(popsize=30)``), for the summary."""
        ...


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is built from: its name, the request size, the dimension, budget and seed."""

    name: str
    popsize: int
    dimension: int
    budget: int
    seed: int
    blocks: tuple[int, ...] = ()  # z's blocks optimised in turn (LayerCycle); (): one strategy over all of z

    @classmethod
    def of(cls, config: Any, projection: Any) -> StrategySpec:
        """The spec of a run: a ``TuneConfig`` and its projection (whose ``cycle_blocks`` ask for a cycle)."""
        return cls(config.optimizer, config.popsize, projection.dimension, config.budget, config.seed,
                   tuple(getattr(projection, "cycle_blocks", ())))


# --------------------------------------------------------------------------------------- nevergrad


class NevergradStrategy:
    """A nevergrad optimizer whose generation is the request: ask ``n`` candidates, tell them all."""

    def __init__(self, spec: StrategySpec) -> None:
        self.name, self.dimension = spec.name, spec.dimension
        self._opt, self._resolved = _pinned_optimizer(spec)
        self._asked: list[Any] = []

    def ask(self, n: int) -> np.ndarray:
        self._asked = [self._opt.ask() for _ in range(n)]
        return np.stack([c.value for c in self._asked]).astype(np.float32)

    def tell(self, z: np.ndarray, losses: np.ndarray) -> None:
        if len(losses) != len(self._asked):
            raise ValueError(f"told {len(losses)} losses for a generation of {len(self._asked)} candidates")
        for candidate, loss in zip(self._asked, losses):
            self._opt.tell(candidate, float(loss))
        self._asked = []

    def recommend(self) -> np.ndarray:
        return np.asarray(self._opt.provide_recommendation().value, dtype=np.float32)

    def describe(self) -> str:
        return self._resolved

    @property
    def population(self) -> int | None:
        """The optimizer's own generation size where it has one (pycma's ``popsize``), else None."""
        inner = getattr(self._opt, "_popsize", None)
        return int(inner) if inner is not None else None


def nevergrad_class(name: str) -> Any:
    """``ng.optimizers.registry[name]`` (a class or a configured family)."""
    return ng.optimizers.registry[name]


def _instantiate(cls: Any, spec: StrategySpec) -> Any:
    parametrization = ng.p.Array(init=np.zeros(spec.dimension))
    parametrization.random_state = np.random.RandomState(spec.seed)
    try:
        return cls(parametrization=parametrization, budget=spec.budget, num_workers=spec.popsize)
    except ValueError as exc:
        raise ValueError(f"optimizer {spec.name} with popsize {spec.popsize}: {exc}") from None


def _label(cls: Any) -> str:
    return str(getattr(cls, "name", None) or getattr(cls, "__name__", None) or cls)


def _pinned_optimizer(spec: StrategySpec) -> tuple[Any, str]:
    """The optimizer instance with its population pinned to ``spec.popsize``, and how it was resolved."""
    cls = nevergrad_class(spec.name)
    chain = [spec.name]
    if spec.name == "CMA":  # the registry's CMA is a selector; the paper's is pycma's standard CMA-ES
        cls = ng.optimizers.ParametrizedCMA(popsize=spec.popsize)
    if spec.popsize < 2 and "CMA" in spec.name:
        raise ValueError(f"optimizer {spec.name} needs popsize >= 2 (CMA-ES recombines a generation); "
                         "with --popsize 1 use OnePlusOne")
    for _ in range(8):  # selectors (NGOpt -> NGOpt16 -> CMA -> CMAstd) resolve to what they would run
        if getattr(cls, "no_parallelization", False) and spec.popsize > 1:
            raise ValueError(
                f"optimizer {spec.name} evaluates one candidate at a time (nevergrad: no parallelization), but every "
                f"request scores a population of {spec.popsize}; use --popsize 1, or a population strategy: SPSA "
                "(batched, ours), CMA, DiagonalCMA, TBPSA, PSO, TwoPointsDE"
            )
        if isinstance(cls, ConfiguredOptimizer):
            config = cls.config()
            key = next((k for k in POPULATION_KEYS if k in config), None)
            pins = {key: spec.popsize} if key is not None else {}
            if key is not None and config.get("elitist"):  # elitist CMA asks P + 1 per generation
                pins["elitist"] = False
            if any(config[k] != v for k, v in pins.items()):
                cls = type(cls)(**{**config, **pins})
            opt = _instantiate(cls, spec)
            chain.append(f"{type(cls).__name__}({', '.join(f'{k}={v}' for k, v in pins.items())})")
        else:
            opt = _instantiate(cls, spec)
            if cls is not nevergrad_class(spec.name):
                chain.append(_label(cls))
        select = getattr(opt, "_select_optimizer_cls", None)
        if select is None:
            own = getattr(opt, "_popsize", None)  # pycma's generation, where the family has one
            if own is not None and own != spec.popsize:
                raise ValueError(f"optimizer {spec.name} ({' -> '.join(chain)}) runs generations of {own}, not the "
                                 f"requested {spec.popsize}; use CMA, DiagonalCMA or SPSA")
            return opt, " -> ".join(chain)
        cls = select()
    raise ValueError(f"optimizer {spec.name} did not resolve to a concrete optimizer: {' -> '.join(chain)}")


# -------------------------------------------------------------------------------------------- SPSA


class BatchedSPSA:
    """SPSA with a population: ``n // 2`` antithetic pairs ``x ± c_k Δ_i`` (Rademacher Δ) per request
    and one averaged gradient estimate ``g = mean_i (L+ - L-) / (2 c_k) Δ_i`` per generation (ZIP's
    estimator), clipped to ``max_grad_norm``; then ``x -= a_k g``. Gains are Spall's:
    ``a_k = a / (k + 1 + A)^0.602``, ``c_k = c / (k + 1)^0.101``, ``A`` a tenth of the generations.
    An odd ``n`` adds ``x`` itself (its loss only counts towards the best seen)."""

    def __init__(self, spec: StrategySpec, *, a: float = 0.2, c: float = 0.1, max_grad_norm: float | None = 10.0) -> None:
        if spec.popsize < 2:
            raise ValueError("SPSA needs popsize >= 2: each generation evaluates antithetic pairs")
        self.name, self.dimension = spec.name, spec.dimension
        self.a, self.c, self.max_grad_norm = a, c, max_grad_norm
        self.big_a = 0.1 * max(1, spec.budget // spec.popsize)
        self.x = np.zeros(spec.dimension, dtype=np.float64)
        self.k = 0
        self._rng = np.random.default_rng(spec.seed)
        self._delta: np.ndarray | None = None

    def _ck(self) -> float:
        return self.c / (self.k + 1) ** 0.101

    def ask(self, n: int) -> np.ndarray:
        pairs = n // 2
        self._delta = self._rng.choice(np.array([-1.0, 1.0]), size=(pairs, self.dimension))
        step = self._ck() * self._delta
        rows = [self.x + step, self.x - step] + ([self.x[None, :]] if n % 2 else [])
        return np.concatenate(rows).astype(np.float32)

    def tell(self, z: np.ndarray, losses: np.ndarray) -> None:
        assert self._delta is not None, "tell without ask"
        pairs = len(self._delta)
        if pairs:
            losses = np.asarray(losses, dtype=np.float64)
            diff = (losses[:pairs] - losses[pairs : 2 * pairs]) / (2 * self._ck())
            grad = (diff[:, None] * self._delta).mean(0)
            norm = float(np.linalg.norm(grad))
            if self.max_grad_norm is not None and norm > self.max_grad_norm:
                grad *= self.max_grad_norm / norm
            self.x -= self.a / (self.k + 1 + self.big_a) ** 0.602 * grad
        self.k += 1
        self._delta = None

    def recommend(self) -> np.ndarray:
        return self.x.astype(np.float32)

    def describe(self) -> str:
        return f"BatchedSPSA(a={self.a}, c={self.c}, max_grad_norm={self.max_grad_norm})"


# ------------------------------------------------------------------------------------ layer cycle


def layer_budgets(budget: int, popsize: int, layers: int) -> list[int]:
    """Training queries each layer gets when generation ``g`` (``min(popsize, what is left)`` queries)
    goes to layer ``g mod layers``: they add up to ``budget`` exactly."""
    out = [0] * layers
    for g, start in enumerate(range(0, budget, popsize)):
        out[g % layers] += min(popsize, budget - start)
    return out


class LayerCycle:
    """One strategy per block of z (per prompted layer), asked in turn, one generation each: layer
    ``l``'s candidates vary block ``l`` and hold the others at the best point seen (z = 0 at first)."""

    def __init__(self, spec: StrategySpec) -> None:
        if sum(spec.blocks) != spec.dimension or len(spec.blocks) < 2:
            raise ValueError(f"a layer cycle needs >= 2 blocks adding up to {spec.dimension}, received {spec.blocks}")
        self.name, self.dimension, self.blocks = spec.name, spec.dimension, spec.blocks
        self.starts = [sum(spec.blocks[:i]) for i in range(len(spec.blocks))]
        budgets = layer_budgets(spec.budget, spec.popsize, len(spec.blocks))
        self.inner = [make_strategy(StrategySpec(spec.name, spec.popsize, size, max(1, b), spec.seed + 7919 * i))
                      for i, (size, b) in enumerate(zip(spec.blocks, budgets))]
        self.active = 0  # the layer the next generation belongs to
        self.spent = [0] * len(spec.blocks)  # training queries told to each layer
        self.incumbent = np.zeros(spec.dimension, dtype=np.float32)
        self.incumbent_loss = float("inf")

    def _block(self, layer: int) -> slice:
        return slice(self.starts[layer], self.starts[layer] + self.blocks[layer])

    def ask(self, n: int) -> np.ndarray:
        z = np.repeat(self.incumbent[None, :], n, axis=0)
        z[:, self._block(self.active)] = self.inner[self.active].ask(n)
        return z

    def tell(self, z: np.ndarray, losses: np.ndarray) -> None:
        self.inner[self.active].tell(z[:, self._block(self.active)], losses)
        self.spent[self.active] += len(losses)
        i = int(np.argmin(losses))
        if losses[i] < self.incumbent_loss:
            self.incumbent, self.incumbent_loss = np.asarray(z[i], dtype=np.float32).copy(), float(losses[i])
        self.active = (self.active + 1) % len(self.blocks)

    def recommend(self) -> np.ndarray:
        """Each layer's own recommendation, side by side."""
        return np.concatenate([s.recommend() for s in self.inner]).astype(np.float32)

    def describe(self) -> str:
        return f"LayerCycle({len(self.blocks)} layers x {self.inner[0].describe()})"


# ---------------------------------------------------------------------------------------- registry

STRATEGIES: dict[str, Callable[[StrategySpec], Strategy]] = {"SPSA": BatchedSPSA}
"""Ours, found before nevergrad's registry (our ``SPSA`` shadows nevergrad's sequential one)."""


def check_strategy_name(name: str) -> None:
    """``ValueError`` naming close matches unless ``name`` is ours or in nevergrad's registry."""
    if name in STRATEGIES or name in ng.optimizers.registry:
        return
    names = [*STRATEGIES, *ng.optimizers.registry]
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; e.g. CMA, DiagonalCMA, TBPSA, SPSA, OnePlusOne, NGOpt"
    raise ValueError(f"unknown optimizer {name!r}{hint}")


def make_strategy(spec: StrategySpec) -> Strategy:
    """The strategy ``spec.name`` over ``z in R^spec.dimension``, starting at 0, seeded."""
    check_strategy_name(spec.name)
    if spec.blocks:
        return LayerCycle(spec)
    if spec.name in STRATEGIES:
        return STRATEGIES[spec.name](spec)
    return NevergradStrategy(spec)
