"""White-box baselines, in-process: the ceiling a black-box user is compared against, not a competitor.

- CoOp: a text context of the same shape as the black-box text prompt (``n_ctx_text`` x text width,
  starting at the template's own words like z = 0 does), trained by gradient descent through the
  frozen text tower on the same training shots; the step with the lowest validation loss is kept.
- Linear probe: logistic regression (L-BFGS) on frozen, L2-normalised image features of the same
  training shots; the weight decay with the best validation accuracy is kept.

The server's ``PromptedCLIP`` runs its towers under ``torch.inference_mode`` (no autograd), so the
CoOp text forward is written here from the public submodules of ``transformers.CLIPModel``, placing
the context exactly as the server does: ``[BOS] ctx_1..ctx_n tokens(class text) [EOS]``, causal mask,
EOS pooling. A test checks it against ``PromptedCLIP.encode_text``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from bptvlm.client.config import Template
from bptvlm.client.data import TaskLike
from bptvlm.server.deep import text_hidden, text_pooled
from bptvlm.server.model import PromptedCLIP
from bptvlm.world.evaluate import fit_linear_probe

logger = logging.getLogger(__name__)

PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


class CoOpText:
    """Text features ``[C, E]`` of the class texts with a trainable context ``ctx`` ``[n_ctx, D_text]``.

    The context sent to the text tower is ``init + ctx``: ``init`` holds the token embeddings of the
    template's words before ``{}`` (zero-padded), as the server's ``context_init`` does.
    """

    def __init__(self, clip: PromptedCLIP, class_texts: list[str], n_ctx: int, prefix: str = "") -> None:
        self.clip = clip
        self.text = clip.model.text_model
        tok = clip.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        token_ids = clip.tokenize(class_texts).token_ids
        rows = [[tok.bos_token_id] + [pad] * n_ctx + list(t) + [tok.eos_token_id] for t in token_ids]
        seq = max(len(r) for r in rows)
        self.ids = torch.tensor([r + [pad] * (seq - len(r)) for r in rows], device=clip.device)  # [C, L]
        self.eos_at = torch.tensor([len(r) - 1 for r in rows], device=clip.device)  # [C]
        self.n_ctx = n_ctx
        with torch.no_grad():
            init = clip.context_init(prefix, n_ctx) if prefix else torch.zeros(n_ctx, clip.limits.text_width)
        self.init = init.detach().clone().to(clip.device, clip.dtype)  # [n_ctx, D]
        self.ctx = torch.zeros_like(self.init, requires_grad=True)  # [n_ctx, D]

    def features(self, ctx: torch.Tensor | None = None, deep: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features ``[C, E]`` (``ctx`` defaults to the trainable one; grads flow).

        ``ctx``: ``[n_ctx, D]`` shared by every class, or ``[C, n_ctx, D]`` one per class; ``deep``:
        ``[Ld, n_ctx, D]`` replacing the context positions at the input of layers ``1 .. Ld``
        (server/deep.py, as the server places ``text_deep_prompt``)."""
        ctx = self.ctx if ctx is None else ctx
        emb = self.text.embeddings
        tokens = emb.token_embedding(self.ids)  # [C, L, D]
        c, seq, _ = tokens.shape
        full = (self.init + ctx).expand(c, -1, -1)  # [C, n_ctx, D]
        x = torch.cat([tokens[:, :1], full, tokens[:, 1 + self.n_ctx :]], dim=1)
        if deep is not None:
            hidden = text_hidden(self.text, x, deep=deep.unsqueeze(0).expand(c, -1, -1, -1))
            return F.normalize(self.clip.model.text_projection(text_pooled(self.text, hidden, self.eos_at)).float(), dim=-1)
        x = x + emb.position_embedding(emb.position_ids[:, :seq])
        mask = create_causal_mask(config=self.text.config, inputs_embeds=x, attention_mask=None, cache=None)
        hidden = self.text.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        pooled = self.text.final_layer_norm(hidden[torch.arange(c, device=x.device), self.eos_at])
        return F.normalize(self.clip.model.text_projection(pooled).float(), dim=-1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (many small ops: threads only add synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def image_features(clip: PromptedCLIP, images: np.ndarray) -> torch.Tensor:
    """Frozen, normalised image features ``[N, E]`` (a normal tensor, usable with autograd)."""
    with torch.inference_mode():
        feats = clip.encode_images(clip.preprocess(images))[0]
    return feats.clone()


def _splits(clip: PromptedCLIP, data: TaskLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    assert data.val_images is not None and data.val_labels is not None
    raw = {"train": (data.train_images, data.train_labels), "val": (data.val_images, data.val_labels),
           "test": (data.test_images, data.test_labels)}  # fmt: skip
    return {k: (image_features(clip, x), torch.as_tensor(np.asarray(y), dtype=torch.long)) for k, (x, y) in raw.items()}


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def run_coop(clip: PromptedCLIP, data: TaskLike, template: Template, n_ctx: int, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """Train the context (AdamW, cosine schedule, full batch); keep the step of lowest val loss."""
    with one_thread():
        return _coop(clip, data, template, n_ctx, steps=steps, lr=lr, seed=seed)


def _coop(clip: PromptedCLIP, data: TaskLike, template: Template, n_ctx: int, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    feats = _splits(clip, data)
    coop = CoOpText(clip, [template.class_text(n) for n in data.class_names], n_ctx, template.prefix)
    scale = clip.model.logit_scale.detach().float().exp()
    opt = torch.optim.AdamW([coop.ctx], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    x_tr, y_tr = feats["train"]
    x_va, y_va = feats["val"]
    best = (float("inf"), 0, coop.ctx.detach().clone())
    for step in range(steps + 1):
        if step % 10 == 0 or step == steps:
            with torch.no_grad():
                val_loss = float(F.cross_entropy(scale * x_va @ coop.features().T, y_va))
            if val_loss < best[0]:
                best = (val_loss, step, coop.ctx.detach().clone())
        if step == steps:
            break
        loss = F.cross_entropy(scale * x_tr @ coop.features().T, y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        text = coop.features(best[2])
        acc = {s: _acc(scale * x @ text.T, y) for s, (x, y) in feats.items()}
    return {"val_loss": best[0], "val_accuracy": acc["val"], "test_accuracy": acc["test"], "train_accuracy": acc["train"],
            "selected": f"step {best[1]} of {steps}", "wall_s": round(time.perf_counter() - start, 3)}


def run_linear_probe(clip: PromptedCLIP, data: TaskLike, *, seed: int) -> dict[str, Any]:
    """Logistic regression on frozen image features; weight decay chosen on validation accuracy."""
    with one_thread():
        return _probe(clip, data, seed=seed)


def _probe(clip: PromptedCLIP, data: TaskLike, *, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    feats = _splits(clip, data)
    x_tr, y_tr = feats["train"]
    n_classes = len(data.class_names)
    best: tuple[float, float, float, torch.nn.Linear | None] = (-1.0, 0.0, float("inf"), None)
    for wd in PROBE_WEIGHT_DECAYS:
        lin = fit_linear_probe(x_tr, y_tr, n_classes, weight_decay=wd, max_iter=300, seed=seed)
        with torch.no_grad():
            x_va, y_va = feats["val"]
            val_acc, val_loss = _acc(lin(x_va * 10), y_va), float(F.cross_entropy(lin(x_va * 10), y_va))
        if (val_acc, -val_loss) > (best[0], -best[2]):
            best = (val_acc, wd, val_loss, lin)
    chosen = best[3]
    assert chosen is not None
    with torch.no_grad():
        x_te, y_te = feats["test"]
        test_acc = _acc(chosen(x_te * 10), y_te)
    return {"val_loss": best[2], "val_accuracy": best[0], "test_accuracy": test_acc, "selected": f"weight decay {best[1]:g}",
            "wall_s": round(time.perf_counter() - start, 3)}
