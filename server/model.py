"""The frozen CLIP with prompts, population-batched. Knows torch and transformers, nothing of HTTP.

Prompts enter through the public submodules of ``transformers.CLIPModel``; no model code is copied.

Text: for every class text ``t_c`` the sequence is ``[BOS] ctx_1 .. ctx_n tokens(t_c) [EOS]``, where the
context vectors replace the token embeddings of ``n`` placeholder slots (CoOp's unified context). The
encoder runs causally and pools at EOS. Sequences are padded only to the longest in the batch (exact
under the causal mask: nothing before EOS attends to what follows it).

Vision: ``m`` prompt tokens are appended to ``[CLS, patches]`` after the position embeddings, before
the pre-layer-norm (``pre_ln``, the paper's placement), or after it (``post_ln``, ours: the prompt then
keeps the scale the client gave it instead of being normalised to full strength). Pooling at CLS.

Deep prompts (``deep.py``): at the input of every layer ``l >= 1`` up to the deep prompt's depth, the
context positions (text) or the appended prompt tokens (vision) are replaced by that layer's own vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bptvlm.shared.protocol import Placement, PromptLimits

from . import deep as layers
from .cache import ByteLRU, text_bytes
from .loading import LoadedModel
from .packed import pack_encoders, packing_available

MAX_VISUAL_PROMPT = 64
TOKEN_CACHE_BYTES = 16 * 2**20  # memoised token ids, keys included


def default_batch_images(device: torch.device | str, vision_width: int = 128) -> int:
    """Images per vision-tower chunk. On CPU small chunks stay in cache, and the wider the tower the
    smaller the chunk (BENCHMARKS.md): the embedded model (width 128) ran a 30 x 160 joint generation
    in 2.47 s at 4096 and about half that at 256; the ViT-B/32 shape (width 768) ran 9.8-9.9 images/s
    in chunks of 32 and 8.4-9.2 in chunks of 160. So 256 x 128 / width, in multiples of 32."""
    if torch.device(device).type == "cuda":
        return 4096
    return max(32, (256 * 128 // max(1, vision_width)) // 32 * 32)


@dataclass(frozen=True)
class TextBatch:
    """Class texts ready for the text tower: token ids without BOS/EOS, one list per class."""

    token_ids: tuple[tuple[int, ...], ...]


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + max(1, size)))


def _normalize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit-norm rows, normalised in float32, held in ``dtype`` (the served dtype: what the caches keep)."""
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


class PromptedCLIP:
    """A frozen ``CLIPModel`` that scores prompt populations.

    Shapes: ``P`` candidates, ``N`` images, ``C`` classes, ``E`` projection width. Weights, activations,
    pixels and features are in ``dtype`` (the served dtype); logits and everything after them in float32.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_images: int | None = None,
        pack: bool | None = None,
    ) -> None:
        """``pack``: the encoders' linears in oneDNN's packed form (``server/packed.py``); ``None``: where
        the device and dtype have it (CPUs)."""
        self.device = torch.device(device)
        self.dtype = dtype
        # The published statistics come from the float32 weights: one model publishes the same limits
        # whatever dtype serves it (white-box baselines compare them with their own copy).
        self.model = loaded.model.eval().requires_grad_(False).to(self.device, torch.float32)
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.model_id = loaded.model_id
        self.max_batch_images = max_batch_images or default_batch_images(self.device, self.model.config.vision_config.hidden_size)
        self._token_ids: ByteLRU[tuple[str, ...], TextBatch] = ByteLRU(
            TOKEN_CACHE_BYTES, lambda b: sum(8 * len(ids) + 64 for ids in b.token_ids), text_bytes)
        self._text = self.model.text_model
        self._vision = self.model.vision_model
        self.limits = self._compute_limits()
        available = packing_available(self.device, dtype)
        if pack and not available:
            raise ValueError(f"no packed oneDNN linear for {dtype} on {self.device}: pass pack=None or False")
        self.packed = available if pack is None else pack
        if self.packed:
            pack_encoders(self.model, dtype)  # from the float32 weights
        self.model.to(dtype)

    # --- metadata --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _compute_limits(self) -> PromptLimits:
        tcfg, vcfg = self.model.config.text_config, self.model.config.vision_config
        patch = self._vision.embeddings.patch_embedding.weight.float()
        # Scale of the vision tokens after the pre-layer-norm, on fixed-seed normalised pixels.
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(4, vcfg.num_channels, vcfg.image_size, vcfg.image_size, generator=gen)
        tokens = self._vision.pre_layrnorm(self._vision.embeddings(pixels.to(self.device)))  # float32 here
        return PromptLimits(
            text_width=tcfg.hidden_size,
            vision_width=vcfg.hidden_size,
            max_text_context=tcfg.max_position_embeddings - 3,
            max_visual_prompt=MAX_VISUAL_PROMPT,
            context_length=tcfg.max_position_embeddings,
            image_size=vcfg.image_size,
            patch_size=vcfg.patch_size,
            num_channels=vcfg.num_channels,
            projection_dim=self.model.config.projection_dim,
            token_embedding_std=float(self._text.embeddings.token_embedding.weight.float().std()),
            patch_embedding_mean=float(patch.mean()),
            patch_embedding_std=float(patch.std()),
            patch_token_std=float(tokens[:, 1:].float().std()),
            text_layers=len(self._text.encoder.layers),
            vision_layers=len(self._vision.encoder.layers),
            text_hidden_std=layers.text_layer_stds(self._text, self._text_probe_ids()),
            vision_hidden_std=layers.vision_layer_stds(self._vision, pixels.to(self.device)),
        )

    def _text_probe_ids(self) -> torch.Tensor:
        """The fixed text probe of the published hidden-state statistics: 8 sequences of BOS, 16
        fixed-seed random token ids and EOS (fewer ids when the model's context is shorter)."""
        tcfg, tok = self.model.config.text_config, self.tokenizer
        length = min(16, tcfg.max_position_embeddings - 2)
        gen = torch.Generator().manual_seed(0)
        body = torch.randint(0, tcfg.vocab_size, (8, length), generator=gen)
        bos = torch.full((8, 1), tok.bos_token_id if tok.bos_token_id is not None else 0)
        eos = torch.full((8, 1), tok.eos_token_id if tok.eos_token_id is not None else tcfg.vocab_size - 1)
        return torch.cat([bos, body, eos], dim=1).to(self.device)

    # --- inputs ----------------------------------------------------------------------------------

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> normalised pixel values ``[N, 3, S, S]`` (served dtype, CPU: the tower
        rounds them to it anyway, so caching them rounded changes no result and halves a bf16 cache)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].to(self.dtype)

    def tokenize(self, texts: list[str]) -> TextBatch:
        """Token ids of each class text, without special tokens (memoised by bytes: a tuning run repeats them)."""
        key = tuple(texts)
        found = self._token_ids.get(key)
        if found is None:
            found = self._tokenize_uncached(key)
            self._token_ids.put(key, found)
        return found

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text without special tokens; not memoised (callers' texts stay out of the cache)."""
        return [len(ids) for ids in self._tokenize_uncached(tuple(texts)).token_ids]

    def _tokenize_uncached(self, texts: tuple[str, ...]) -> TextBatch:
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return TextBatch(tuple(tuple(x) for x in ids))

    def context_init(self, text: str, n_ctx: int) -> torch.Tensor:
        """Token embeddings of ``text``, zero-padded to ``[n_ctx, D_text]``."""
        ids = self.tokenize([text]).token_ids[0]
        if len(ids) > n_ctx:
            raise ValueError(f"context_init {text!r} has {len(ids)} tokens, more than the {n_ctx} context vectors")
        out = torch.zeros(n_ctx, self.limits.text_width, device=self.device, dtype=self.dtype)
        if ids:
            out[: len(ids)] = self._text.embeddings.token_embedding(torch.tensor(ids, device=self.device))
        return out

    # --- towers ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(
        self, batch: TextBatch, context: torch.Tensor | None = None, *, pad_to: int | None = None,
        deep: torch.Tensor | None = None, deep_mode: str = "replace",
    ) -> torch.Tensor:
        """Normalised text features ``[P, C, E]`` (``P = 1`` without context).

        ``context``: ``[P, n_ctx, D_text]`` shared by every class (the paper), or ``[P, C, n_ctx, D_text]``
        one per class (CoOp's class-specific context), placed after BOS, before each class text.
        Sequences are padded to the longest one; ``pad_to`` pads further (the reference implementation's
        full context length: same result, more work; only benchmarks use it).
        ``deep``: ``[P, Ld, n_ctx, D_text]`` (with a context), every class's context positions at the input
        of layers ``1 .. Ld`` (``deep_mode="add"``: added to the states there).
        """
        n_ctx = 0 if context is None else context.shape[-2]
        if deep is not None and (context is None or deep.shape[-2] != n_ctx):
            raise ValueError(f"a deep text prompt of {deep.shape[-2]} vectors needs a context of as many, received {n_ctx}")
        if context is not None and context.dim() == 4 and context.shape[1] != len(batch.token_ids):
            raise ValueError(f"a class-specific context has {context.shape[1]} classes, the request {len(batch.token_ids)}")
        ids, eos_at = self._assemble_ids(batch, n_ctx, pad_to)  # [C, L], [C]
        embeds = self._text.embeddings.token_embedding(ids)  # [C, L, D]
        if context is None:
            return self._text_tower(embeds, eos_at).unsqueeze(0)
        per_chunk = max(1, self.max_batch_images // max(1, len(batch.token_ids)))
        feats = []
        for sl in _chunks(context.shape[0], per_chunk):
            ctx = context[sl].to(self.device, self.dtype)  # [p, n, D] or [p, C, n, D]
            x = embeds.unsqueeze(0).repeat(ctx.shape[0], 1, 1, 1)  # [p, C, L, D]
            x[:, :, 1 : 1 + n_ctx] = ctx if ctx.dim() == 4 else ctx.unsqueeze(1)
            p, c, seq, d = x.shape
            dp = None if deep is None else layers.per_row(deep[sl].to(self.device, self.dtype), c)  # [p * C, Ld, n, D]
            feats.append(self._text_tower(x.reshape(p * c, seq, d), eos_at.repeat(p), dp, deep_mode).reshape(p, c, -1))
        return torch.cat(feats)

    def _assemble_ids(self, batch: TextBatch, n_ctx: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = [[tok.bos_token_id] + [pad] * n_ctx + list(t) + [tok.eos_token_id] for t in batch.token_ids]
        seq = max(max(len(r) for r in rows), pad_to or 0)
        if seq > self.limits.context_length:
            longest = max(range(len(rows)), key=lambda i: len(rows[i]))
            raise ValueError(
                f"class text {longest} needs {seq} positions with {n_ctx} context vectors; "
                f"the model has {self.limits.context_length}"
            )
        ids = torch.tensor([r + [pad] * (seq - len(r)) for r in rows], device=self.device)
        eos_at = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        return ids, eos_at

    def _text_tower(self, embeds: torch.Tensor, eos_at: torch.Tensor, deep: torch.Tensor | None = None,
                    deep_mode: str = "replace") -> torch.Tensor:
        """``embeds [B, L, D]`` (token embeddings, no positions), ``deep [B, Ld, n, D]`` -> normalised
        features ``[B, E]``."""
        hidden = layers.text_hidden(self._text, embeds, deep=deep, mode=deep_mode)
        pooled = layers.text_pooled(self._text, hidden, eos_at)
        return _normalize(self.model.text_projection(pooled), self.dtype)

    @torch.inference_mode()
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        prompt: torch.Tensor | None = None,
        placement: Placement = "pre_ln",
        deep: torch.Tensor | None = None,
        deep_mode: str = "replace",
    ) -> torch.Tensor:
        """Normalised image features ``[P, N, E]`` (``P = 1`` without prompt).

        ``pixel_values``: ``[N, 3, S, S]``; ``prompt``: ``[P, m, D_vision]`` (``m`` = the tower's
        positions for ``placement="add"``, any ``m`` for the appended placements); ``deep``:
        ``[P, Ld, m, D_vision]`` (appended placements only), the prompt tokens at the input of layers ``1 .. Ld``.
        """
        n = pixel_values.shape[0]
        if deep is not None and (prompt is None or placement == "add" or deep.shape[-2] != prompt.shape[1]):
            raise ValueError("a deep visual prompt of m tokens needs an appended visual prompt of m tokens")
        if prompt is None:
            feats = [self._vision_tower(self._vision_tokens(pixel_values[sl])) for sl in _chunks(n, self.max_batch_images)]
            return torch.cat(feats).unsqueeze(0)
        rows = []
        per_chunk = max(1, self.max_batch_images // n)
        for img_sl in _chunks(n, self.max_batch_images):
            tokens = self._vision_tokens(pixel_values[img_sl])  # [n', T, Dv], positions added
            if placement != "pre_ln":
                tokens = self._vision.pre_layrnorm(tokens)
            part = []
            for sl in _chunks(prompt.shape[0], per_chunk):
                pr = prompt[sl].to(self.device, self.dtype)  # [p, m, Dv]
                p, nn_ = pr.shape[0], tokens.shape[0]
                if placement == "add":  # m == T: the prompt shifts every position, the sequence keeps its length
                    x = tokens.unsqueeze(0) + pr.unsqueeze(1)  # [p, n', T, Dv]
                else:  # appended: [p, n', T + m, Dv]
                    x = torch.cat([tokens.unsqueeze(0).expand(p, -1, -1, -1), pr.unsqueeze(1).expand(-1, nn_, -1, -1)], dim=2)
                x = x.reshape(p * nn_, -1, tokens.shape[-1])
                if placement == "pre_ln":
                    x = self._vision.pre_layrnorm(x)
                dp = None if deep is None else layers.per_row(deep[sl].to(self.device, self.dtype), nn_)  # [p * n', Ld, m, Dv]
                part.append(self._vision_tower(x, normed=True, deep=dp, deep_mode=deep_mode).reshape(p, nn_, -1))
            rows.append(torch.cat(part))
        return torch.cat(rows, dim=1)

    def _vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._vision.embeddings(pixel_values.to(self.device, self.dtype))  # [N, 1 + patches, Dv]

    def _vision_tower(self, tokens: torch.Tensor, normed: bool = False, deep: torch.Tensor | None = None,
                      deep_mode: str = "replace") -> torch.Tensor:
        """Tokens ``[B, T, Dv]`` -> normalised features ``[B, E]``; ``normed``: pre-LN already applied;
        ``deep [B, Ld, m, Dv]``: replaces the last ``m`` tokens at layers ``1 .. Ld``."""
        x = tokens if normed else self._vision.pre_layrnorm(tokens)
        hidden = layers.vision_hidden(self._vision, x, deep=deep, mode=deep_mode)
        pooled = layers.vision_pooled(self._vision, hidden)
        return _normalize(self.model.visual_projection(pooled), self.dtype)

    # --- scores ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """``[Pi, N, E]`` x ``[Pt, C, E]`` -> float32 ``[P, N, C]`` (``Pi`` or ``Pt`` may be 1 and broadcast)."""
        scale = self.model.logit_scale.float().exp()
        return scale * torch.matmul(image_feats.float(), text_feats.float().transpose(-1, -2))


def loss_per_candidate(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce", gamma: float = 2.0) -> torch.Tensor:
    """Mean cross-entropy (or focal loss) over the images: ``[P, N, C]``, ``[N]`` -> ``[P]``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)  # [P, N]
    if kind == "focal":
        picked = (1 - picked.exp()).pow(gamma) * picked
    elif kind != "ce":
        raise ValueError(f"loss must be 'ce' or 'focal', got {kind!r}")
    return -picked.mean(dim=1)

