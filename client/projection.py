"""Seeded random projections from the optimizer's intrinsic space to prompt tensors (client only).

``z = [z_text (d_text), z_vision (d_vision)]`` maps linearly to
``text_context = z_text @ A_text`` and ``visual_prompt = z_vision @ A_vision``, population first.
The text context is one context shared by every class (the paper), or with ``class_contexts = C``
one context per class (CoOp's class-specific context): ``A_text`` then has ``C`` times the columns.
With ``shared_text_dims = h`` as well (ours, "mixed"), the first ``h`` rows of ``A_text`` repeat one
block for every class: those dimensions of ``z`` move every class's context alike, the rest each
class's own.
The matrices are drawn once from the statistics the server publishes (``PromptLimits``) and never
leave the client:

- ``A_text ~ N(0, token_embedding_std / (sqrt(d_text) * sigma))`` (paper)
- ``A_vision ~ N(patch_embedding_mean * K / d_vision, patch_embedding_std * sqrt(K / d_vision) * sigma)``
  with ``K = num_channels * patch_size**2`` of the served model (the paper's 3072 is ViT-B/32's
  3 x 32 x 32) when the visual prompt goes before the pre-layer-norm (``pre_ln``, the paper);
- ``A_vision ~ N(0, patch_token_std / (sqrt(d_vision) * sigma))`` when it goes after it (``post_ln``)
  or is added to each position after it (``add``), scaled like the text so that sigma keeps its meaning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bptvlm.shared.protocol import TEXT_CONTEXT, VISUAL_PROMPT, PromptLimits, vision_positions

PLACEMENTS = ("pre_ln", "post_ln", "add")
# One text context for every class (the paper); one per class (CoOp's class-specific context); or "mixed" (ours):
# half of z_text moves a context every class shares, half each class's own, and the two add up.
TEXT_CONTEXTS = ("shared", "per_class", "mixed")


class PromptProjection:
    """Maps a population ``z`` float [P, dimension] to ``{"text_context", "visual_prompt"}``.

    A modality with zero intrinsic dimensions or zero prompt tokens is disabled: it takes no part of
    ``z`` and its key is absent from the output.
    """

    cycle_blocks: tuple[int, ...] = ()  # one z, one optimizer (deep.DeepProjection's cycle has blocks)

    def __init__(
        self,
        limits: PromptLimits,
        *,
        n_ctx_text: int = 8,
        n_ctx_vision: int = 5,
        d_text: int = 500,
        d_vision: int = 500,
        sigma: float = 1.0,
        seed: int = 0,
        visual_prompt_position: str = "pre_ln",
        class_contexts: int = 0,
        shared_text_dims: int = 0,
    ) -> None:
        for name, value in (("n_ctx_text", n_ctx_text), ("n_ctx_vision", n_ctx_vision), ("d_text", d_text),
                            ("d_vision", d_vision), ("class_contexts", class_contexts), ("shared_text_dims", shared_text_dims)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, received {value}")
        if n_ctx_text > limits.max_text_context:
            raise ValueError(f"n_ctx_text={n_ctx_text} exceeds the server's max_text_context={limits.max_text_context}")
        if n_ctx_vision > limits.max_visual_prompt and visual_prompt_position != "add":
            raise ValueError(f"n_ctx_vision={n_ctx_vision} exceeds the server's max_visual_prompt={limits.max_visual_prompt}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, received {sigma}")
        if visual_prompt_position not in PLACEMENTS:
            raise ValueError(f"visual_prompt_position must be one of {PLACEMENTS}, received {visual_prompt_position!r}")
        if visual_prompt_position == "add" and d_vision and n_ctx_vision not in (0, vision_positions(limits)):
            raise ValueError(f"an 'add' visual prompt has one vector per vision position ({vision_positions(limits)}), "
                             f"received n_ctx_vision={n_ctx_vision}")
        self.limits = limits
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.visual_prompt_position = visual_prompt_position
        self.n_ctx_text = n_ctx_text if d_text > 0 else 0
        self.n_ctx_vision = n_ctx_vision if d_vision > 0 else 0
        self.d_text = d_text if n_ctx_text > 0 else 0
        self.d_vision = d_vision if n_ctx_vision > 0 else 0
        self.class_contexts = class_contexts if self.d_text else 0
        if shared_text_dims and self.d_text and (not self.class_contexts or shared_text_dims > self.d_text):
            raise ValueError(f"shared_text_dims={shared_text_dims} needs class contexts and at most d_text={self.d_text} dims")
        self.shared_text_dims = shared_text_dims if self.class_contexts else 0
        # Independent streams per modality: disabling one never changes the other's matrix.
        text_seq, vision_seq = np.random.SeedSequence(self.seed).spawn(2)
        contexts = max(1, self.class_contexts)
        self.a_text = self._draw(text_seq, self.d_text, contexts * self.n_ctx_text * limits.text_width, 0.0, self._text_std())
        if self.shared_text_dims:  # these rows: class 0's block, repeated for every class
            h, block = self.shared_text_dims, self.n_ctx_text * limits.text_width
            self.a_text[:h] = np.tile(self.a_text[:h, :block], (1, contexts))
        mean, std = self._vision_stats()
        self.a_vision = self._draw(vision_seq, self.d_vision, self.n_ctx_vision * limits.vision_width, mean, std)

    @staticmethod
    def _draw(seq: np.random.SeedSequence, rows: int, cols: int, mean: float, std: float) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(seq))
        a = rng.standard_normal((rows, cols), dtype=np.float32)  # [d, n_ctx * width]
        a *= np.float32(std)
        a += np.float32(mean)
        return a

    def _text_std(self) -> float:
        if self.d_text == 0:
            return 0.0
        return float(self.limits.token_embedding_std) / (math.sqrt(self.d_text) * self.sigma)

    def _vision_stats(self) -> tuple[float, float]:
        """(mean, std) of ``A_vision`` for the configured placement."""
        if self.d_vision == 0:
            return 0.0, 0.0
        lim = self.limits
        if self.visual_prompt_position in ("post_ln", "add"):
            return 0.0, lim.patch_token_std / (math.sqrt(self.d_vision) * self.sigma)
        k = lim.num_channels * lim.patch_size**2
        return lim.patch_embedding_mean * k / self.d_vision, lim.patch_embedding_std * math.sqrt(k / self.d_vision) * self.sigma

    @property
    def dimension(self) -> int:
        """Length of one ``z``: d_text + d_vision of the enabled modalities."""
        return self.d_text + self.d_vision

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the tensors ``__call__`` returns."""
        names = []
        if self.d_text:
            names.append(TEXT_CONTEXT)
        if self.d_vision:
            names.append(VISUAL_PROMPT)
        return tuple(names)

    def __call__(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """z float [P, dimension] -> text_context float32 [P, n_ctx_text, D_t] (or [P, C, n_ctx_text, D_t]
        with class contexts) and/or visual_prompt float32 [P, n_ctx_vision, D_v]."""
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.dimension:
            raise ValueError(f"z must be [P, {self.dimension}] (population first), received {list(z.shape)}")
        pop = z.shape[0]
        out: dict[str, np.ndarray] = {}
        if self.d_text:
            text = z[:, : self.d_text] @ self.a_text  # [P, (C *) n_ctx_text * D_t]
            per_class = (self.class_contexts,) if self.class_contexts else ()
            out[TEXT_CONTEXT] = text.reshape(pop, *per_class, self.n_ctx_text, self.limits.text_width)
        if self.d_vision:
            vision = z[:, self.d_text :] @ self.a_vision  # [P, n_ctx_vision * D_v]
            out[VISUAL_PROMPT] = vision.reshape(pop, self.n_ctx_vision, self.limits.vision_width)
        return out

    def config(self) -> dict[str, Any]:
        """What rebuilds this projection, given the same server statistics."""
        return {
            "n_ctx_text": self.n_ctx_text,
            "n_ctx_vision": self.n_ctx_vision,
            "d_text": self.d_text,
            "d_vision": self.d_vision,
            "sigma": self.sigma,
            "seed": self.seed,
            "visual_prompt_position": self.visual_prompt_position,
            "class_contexts": self.class_contexts,
            "shared_text_dims": self.shared_text_dims,
        }


MAX_TEXT_PROJECTION_BYTES = 2**30  # a per-class context's A_text grows with the classes: 1,000 ViT-B/32 classes ~8 GB


def text_context_length(tokens: Any, n_ctx_text: int | None, template: Any) -> int:
    """Context vectors of the text prompt: ``n_ctx_text``, or by default the paper's 8, or more if the
    template's prefix has more tokens under the served tokenizer. ``tokens`` counts them: a
    ``ClipClient`` (asks the server, free) or the served ``PromptedCLIP`` (the white-box CoOp baseline).

    The server adds the prefix's token embeddings to the first vectors; the rest start as zero
    embeddings, which are not neutral tokens, so z = 0 is close to the template but not it
    (`python scripts/context_start.py`). The untuned template stays exactly available: it is a
    candidate of the final choice.
    """
    from .config import DEFAULT_N_CTX_TEXT

    if n_ctx_text is not None:
        return n_ctx_text
    return max(DEFAULT_N_CTX_TEXT, tokens.count_tokens([template.prefix])[0] if template.prefix else 0)


def visual_prompt_length(limits: PromptLimits, n_ctx_vision: int | None, position: str) -> int:
    """Visual prompt vectors: ``n_ctx_vision``, or by default 5 appended tokens (the paper's) or, for
    ``add``, one per vision position."""
    from .config import DEFAULT_N_CTX_VISION

    if n_ctx_vision is not None:
        return n_ctx_vision
    return vision_positions(limits) if position == "add" else DEFAULT_N_CTX_VISION


def build_projection(tokens: Any, limits: PromptLimits, config: Any, template: Any, num_classes: int) -> Any:
    """The client's projection for a ``TuneConfig``, with the default prompt lengths resolved: a
    ``PromptProjection``, or for deep prompts or a shared subspace a ``deep.DeepProjection`` over it."""
    from .deep import deepen

    d_text, d_vision = config.dims()
    if getattr(config, "subspace", "separate") == "shared" and d_text and d_vision:
        d_vision = d_text  # one vector drives both prompts
    class_contexts = 0 if config.text_context == "shared" else num_classes
    n_ctx = text_context_length(tokens, config.n_ctx_text, template) if d_text else 0
    size = d_text * max(1, class_contexts) * n_ctx * limits.text_width * 4
    if size > MAX_TEXT_PROJECTION_BYTES:
        raise ValueError(
            f"text_context {config.text_context!r} with {num_classes} classes needs a {size / 2**30:.1f} GiB projection "
            f"(d_text x classes x n_ctx x {limits.text_width} floats) and as many context vectors per candidate; "
            f"use --text-context shared, or fewer classes"
        )
    return deepen(PromptProjection(
        limits,
        n_ctx_text=n_ctx,
        n_ctx_vision=visual_prompt_length(limits, config.n_ctx_vision, config.visual_prompt_position) if d_vision else 0,
        d_text=d_text,
        d_vision=d_vision,
        sigma=config.sigma,
        seed=config.seed,
        visual_prompt_position=config.visual_prompt_position,
        class_contexts=class_contexts,
        shared_text_dims=d_text // 2 if config.text_context == "mixed" else 0,
    ), config)
