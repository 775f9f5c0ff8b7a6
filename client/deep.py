"""Deep prompts and the shared subspace: the projection from z to every prompted layer (client only).

Layer 0 is today's shallow projection (``PromptProjection``: shared, per-class or mixed text context,
the placement's visual initialisation), untouched. Layer ``l >= 1`` (``--depth K``: layers ``1 .. K-1``
of each tower, capped at the tower's depth; ``all``: every layer) has its own seeded matrices,
``A_l ~ N(0, hidden_std_l / (sqrt(d) * sigma))`` with ``hidden_std_l`` the server's published std of
that tower's hidden states at layer ``l``'s input; its text prompt is shared by every class.

How z reaches the layers (``--deep-schedule``):

- ``cycle`` (the paper's): z is the concatenation of one block per layer; block ``l`` drives layer
  ``l`` only; the strategy (``strategies.LayerCycle``) optimises one block per generation, in turn.
- ``joint`` (ours): one z drives every layer, each through its own matrices.

``--subspace shared`` (ours, cross-modal): a layer's block is one vector of ``d_text`` dimensions that
drives both its text and its visual prompt (``d_vision`` is then ``d_text``), instead of two halves.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from bptvlm.shared.protocol import TEXT_CONTEXT, TEXT_DEEP_PROMPT, VISUAL_DEEP_PROMPT, VISUAL_PROMPT, PromptLimits

from .projection import PromptProjection

SCHEDULES = ("cycle", "joint")
DEEP_MODES = ("replace", "add")  # the server's deep_prompt_mode: replace the states (the paper's) or add to them
SUBSPACES = ("separate", "shared")
DEPTH_PATTERN = re.compile(r"^(all|[1-9][0-9]*)$")


def check_depth(depth: str) -> None:
    if not isinstance(depth, str) or not DEPTH_PATTERN.match(depth):
        raise ValueError(f"depth must be a number of layers >= 1 or 'all', received {depth!r}")


def tower_depths(depth: str, limits: PromptLimits) -> tuple[int, int]:
    """Prompted layers (text, vision) for ``--depth``: ``K`` capped at each tower's layers, or every layer."""
    check_depth(depth)
    if depth == "1":
        return 1, 1
    if not limits.text_hidden_std or not limits.vision_hidden_std:
        raise ValueError("the server publishes no per-layer hidden-state statistics (text_hidden_std, vision_hidden_std): "
                         "it serves no deep prompts; use --depth 1")
    lt, lv = limits.text_layers, limits.vision_layers
    if depth == "all":
        return lt, lv
    k = int(depth)
    if k > max(lt, lv):
        raise ValueError(f"--depth {k}: the served towers have {lt} (text) and {lv} (vision) layers; "
                         f"use at most {max(lt, lv)}, or 'all'")
    return min(k, lt), min(k, lv)


class _LayerProjection(PromptProjection):
    """Layer ``l >= 1``: one text prompt for every class; both matrices ``N(0, std_l / (sqrt(d) * sigma))``."""

    def __init__(self, limits: PromptLimits, *, text_std: float, vision_std: float, **kwargs: Any) -> None:
        self._hidden_stds = (text_std, vision_std)
        super().__init__(limits, visual_prompt_position="post_ln", **kwargs)

    def _text_std(self) -> float:
        return self._hidden_stds[0] / (math.sqrt(self.d_text) * self.sigma) if self.d_text else 0.0

    def _vision_stats(self) -> tuple[float, float]:
        return (0.0, self._hidden_stds[1] / (math.sqrt(self.d_vision) * self.sigma)) if self.d_vision else (0.0, 0.0)


def _layer_seed(seed: int, layer: int) -> int:
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0])


class DeepProjection:
    """Maps z float ``[P, dimension]`` to the shallow prompts and ``text_deep_prompt [P, K_t - 1, n, D_t]``
    / ``visual_deep_prompt [P, K_v - 1, m, D_v]``; the same surface as ``PromptProjection``."""

    def __init__(self, base: PromptProjection, depths: tuple[int, int], *, schedule: str = "cycle",
                 shared: bool = False) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"deep_schedule must be one of {SCHEDULES}, received {schedule!r}")
        if shared and base.d_text and base.d_vision and base.d_text != base.d_vision:
            raise ValueError(f"a shared subspace needs d_text == d_vision, received {base.d_text} and {base.d_vision}")
        self.base, self.depths, self.schedule, self.shared = base, depths, schedule, shared
        lim = base.limits
        self.layers: list[PromptProjection] = [base]
        for layer in range(1, max(depths)):
            d_t = base.d_text if layer < depths[0] else 0
            d_v = base.d_vision if layer < depths[1] else 0
            self.layers.append(_LayerProjection(
                lim, n_ctx_text=base.n_ctx_text, n_ctx_vision=base.n_ctx_vision, d_text=d_t, d_vision=d_v,
                sigma=base.sigma, seed=_layer_seed(base.seed, layer),
                text_std=lim.text_hidden_std[layer] if d_t else 0.0, vision_std=lim.vision_hidden_std[layer] if d_v else 0.0))
        self.block_sizes = tuple(self._block(p) for p in self.layers)

    def _block(self, layer: PromptProjection) -> int:
        return max(layer.d_text, layer.d_vision) if self.shared else layer.dimension

    # the PromptProjection surface the run, selection and summaries read
    @property
    def limits(self) -> PromptLimits:
        return self.base.limits

    @property
    def n_ctx_text(self) -> int:
        return self.base.n_ctx_text

    @property
    def n_ctx_vision(self) -> int:
        return self.base.n_ctx_vision

    @property
    def d_text(self) -> int:
        return self.base.d_text

    @property
    def d_vision(self) -> int:
        return self.base.d_vision

    @property
    def dimension(self) -> int:
        """Length of one z: the sum of the layers' blocks (cycle) or the largest block (joint)."""
        return sum(self.block_sizes) if self.schedule == "cycle" else max(self.block_sizes)

    @property
    def cycle_blocks(self) -> tuple[int, ...]:
        """Block sizes a ``LayerCycle`` optimises in turn; () when one z moves everything."""
        return self.block_sizes if self.schedule == "cycle" and len(self.block_sizes) > 1 else ()

    @property
    def modalities(self) -> tuple[str, ...]:
        names = list(self.base.modalities)
        if self.depths[0] > 1 and self.base.d_text:
            names.append(TEXT_DEEP_PROMPT)
        if self.depths[1] > 1 and self.base.d_vision:
            names.append(VISUAL_DEEP_PROMPT)
        return tuple(names)

    def _layer_z(self, z: np.ndarray, index: int) -> np.ndarray:
        """Layer ``index``'s input [P, layers[index].dimension] from the whole z."""
        if self.schedule == "cycle":
            start = sum(self.block_sizes[:index])
            block = z[:, start : start + self.block_sizes[index]]
        else:
            block = z[:, : self.block_sizes[index]]
        layer = self.layers[index]
        if self.shared:  # one vector for both modalities
            return np.concatenate([block[:, : layer.d_text], block[:, : layer.d_vision]], axis=1)
        return block

    def __call__(self, z: np.ndarray) -> dict[str, np.ndarray]:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.dimension:
            raise ValueError(f"z must be [P, {self.dimension}] (population first), received {list(z.shape)}")
        out = self.base(self._layer_z(z, 0))
        parts = [layer(self._layer_z(z, i)) for i, layer in enumerate(self.layers[1:], start=1)]
        for shallow, deep in ((TEXT_CONTEXT, TEXT_DEEP_PROMPT), (VISUAL_PROMPT, VISUAL_DEEP_PROMPT)):
            stack = [part[shallow] for part in parts if shallow in part]
            if stack:
                out[deep] = np.stack(stack, axis=1)  # [P, layers - 1, n, D]
        return out

    def config(self) -> dict[str, Any]:
        """What rebuilds this projection, given the same server statistics."""
        return {**self.base.config(), "text_depth": self.depths[0], "vision_depth": self.depths[1],
                "deep_schedule": self.schedule, "subspace": "shared" if self.shared else "separate"}


def deepen(base: PromptProjection, config: Any) -> PromptProjection | DeepProjection:
    """``base`` itself for the shallow, separate-subspace run (today's projection, unchanged), else the
    ``DeepProjection`` the config's ``depth``, ``deep_schedule`` and ``subspace`` ask for."""
    depths = tower_depths(config.depth, base.limits)
    depths = (depths[0] if base.d_text else 1, depths[1] if base.d_vision else 1)
    shared = config.subspace == "shared"
    if depths == (1, 1) and not shared:
        return base
    return DeepProjection(base, depths, schedule=config.deep_schedule, shared=shared)
