"""Per-layer prompt replacement (VPT-deep) over the public modules of ``transformers.CLIPModel``.

At the input of encoder layer ``l >= 1`` the prompt positions are replaced by that layer's own prompt
vectors: in the text tower the ``n`` context positions after BOS (``start = 1``), in the vision tower
the ``m`` appended prompt tokens after ``[CLS, patches]`` (``start = T``). Layer 0's prompts are the
shallow ones, placed by the caller. A deep prompt with ``Ld`` layers replaces at layers ``1 .. Ld``;
the layers after ``Ld`` run as usual.

Plain functions over ``text_model`` / ``vision_model`` (``CLIPTextTransformer`` /
``CLIPVisionTransformer``): no ``inference_mode`` and no in-place writes on their inputs, so a
white-box trainer can call them under autograd. Without a deep prompt (and nothing to capture) the
towers run the library's own ``encoder`` module (compiled in place by ``--compile``); with one, the
same loop ``CLIPEncoder.forward`` runs (each layer with the mask and keyword arguments), eager.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import create_causal_mask

DEEP_MODES = ("replace", "add")  # replace: the paper's (VPT-deep); add: ours, offsets to the states (z = 0 is shallow)
OUTLIER_SIGMAS = 3.0  # the reference drops hidden-state values further than this from the mean before taking the std


def replace_positions(hidden: torch.Tensor, prompt: torch.Tensor, start: int, mode: str = "replace") -> torch.Tensor:
    """``hidden [B, L, D]`` with positions ``start .. start + n`` replaced by ``prompt [B, n, D]`` (``add``:
    shifted by it), as a new tensor."""
    n = prompt.shape[1]
    if start + n > hidden.shape[1]:
        raise ValueError(f"a deep prompt of {n} vectors at position {start} does not fit {hidden.shape[1]} positions")
    if mode not in DEEP_MODES:
        raise ValueError(f"deep prompt mode must be one of {DEEP_MODES}, received {mode!r}")
    middle = prompt.to(hidden.dtype) if mode == "replace" else hidden[:, start : start + n] + prompt.to(hidden.dtype)
    return torch.cat([hidden[:, :start], middle, hidden[:, start + n :]], dim=1)


def run_layers(
    encoder: Any,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    deep: torch.Tensor | None = None,
    start: int = 0,
    capture: list[torch.Tensor] | None = None,
    mode: str = "replace",
    **kwargs: Any,
) -> torch.Tensor:
    """``encoder.layers`` over ``hidden [B, L, D]``; ``deep [B, Ld, n, D]`` replaces positions
    ``start .. start + n`` at the input of layers ``1 .. Ld``. ``capture`` receives every layer's input
    (after its replacement) and the last layer's output: ``len(layers) + 1`` tensors ``[B, L, D]``.
    ``mode="add"`` adds ``deep`` to those positions instead of replacing them."""
    if deep is None and capture is None:  # the library's encoder module itself (what --compile compiles)
        return encoder(inputs_embeds=hidden, attention_mask=mask, **kwargs).last_hidden_state
    layers = encoder.layers
    if deep is not None and deep.shape[1] > len(layers) - 1:
        raise ValueError(f"a deep prompt for {deep.shape[1]} layers; the tower has {len(layers)} (layers 1..{len(layers) - 1})")
    for i, layer in enumerate(layers):
        if deep is not None and 1 <= i <= deep.shape[1]:
            hidden = replace_positions(hidden, deep[:, i - 1], start, mode)
        if capture is not None:
            capture.append(hidden)
        hidden = layer(hidden, mask, **kwargs)
    if capture is not None:
        capture.append(hidden)
    return hidden


def per_row(deep: torch.Tensor, rows_each: int) -> torch.Tensor:
    """``[P, Ld, n, D]`` -> ``[P * rows_each, Ld, n, D]``: candidate ``p``'s prompt for each of its rows
    (its classes, or its images), population-major as the towers' batches are laid out."""
    p, *rest = deep.shape
    return deep.unsqueeze(1).expand(p, rows_each, *rest).reshape(p * rows_each, *rest)


def text_hidden(
    text_model: Any,
    embeds: torch.Tensor,
    *,
    deep: torch.Tensor | None = None,
    capture: list[torch.Tensor] | None = None,
    mode: str = "replace",
) -> torch.Tensor:
    """Token embeddings ``embeds [B, L, D]`` (no positions; the shallow context already in place after
    BOS) -> last hidden states ``[B, L, D]``, causal as the library's text forward; ``deep [B, Ld, n, D]``
    replaces positions ``1 .. 1 + n`` at layers ``1 .. Ld``."""
    seq = embeds.shape[1]
    x = embeds + text_model.embeddings.position_embedding(text_model.embeddings.position_ids[:, :seq])
    mask = create_causal_mask(config=text_model.config, inputs_embeds=x, attention_mask=None, cache=None)
    return run_layers(text_model.encoder, x, mask, deep=deep, start=1, capture=capture, mode=mode, is_causal=True)


def text_pooled(text_model: Any, hidden: torch.Tensor, eos_at: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, L, D]`` -> final-layer-normed EOS states ``[B, D]`` (before the projection)."""
    return text_model.final_layer_norm(hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_at])


def vision_hidden(
    vision_model: Any,
    tokens: torch.Tensor,
    *,
    deep: torch.Tensor | None = None,
    start: int | None = None,
    capture: list[torch.Tensor] | None = None,
    mode: str = "replace",
) -> torch.Tensor:
    """Tokens ``[B, T + m, D]`` after the pre-layer-norm (the shallow prompt appended last) -> last hidden
    states; ``deep [B, Ld, m, D]`` replaces the last ``m`` positions (or those from ``start``) at layers
    ``1 .. Ld``."""
    if deep is not None and start is None:
        start = tokens.shape[1] - deep.shape[2]
    return run_layers(vision_model.encoder, tokens, None, deep=deep, start=start or 0, capture=capture, mode=mode)


def vision_pooled(vision_model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, D]`` -> post-layer-normed CLS states ``[B, D]`` (before the projection)."""
    return vision_model.post_layernorm(hidden[:, 0])


def clipped_std(values: torch.Tensor, sigmas: float = OUTLIER_SIGMAS) -> float:
    """Std of ``values`` after dropping those further than ``sigmas`` stds from the mean (float32)."""
    v = values.detach().float().reshape(-1)
    mean, std = v.mean(), v.std()
    kept = v[(v - mean).abs() <= sigmas * std]
    return float(kept.std()) if kept.numel() > 1 else float(std)


def text_layer_stds(text_model: Any, token_ids: torch.Tensor) -> list[float]:
    """Clipped std of the text hidden states at the input of every layer, on ``token_ids [B, L]``
    (full sequences, BOS .. EOS): ``len(encoder.layers)`` values, index 0 the encoder's input."""
    capture: list[torch.Tensor] = []
    text_hidden(text_model, text_model.embeddings.token_embedding(token_ids), capture=capture)
    return [clipped_std(h) for h in capture[:-1]]


def vision_layer_stds(vision_model: Any, pixel_values: torch.Tensor) -> list[float]:
    """Clipped std of the vision hidden states at the input of every layer on ``pixel_values
    [N, 3, S, S]``: ``len(encoder.layers)`` values, index 0 the encoder's input (after the pre-layer-norm)."""
    capture: list[torch.Tensor] = []
    vision_hidden(vision_model, vision_model.pre_layrnorm(vision_model.embeddings(pixel_values)), capture=capture)
    return [clipped_std(h) for h in capture[:-1]]
