"""The white-box ceiling of the same shape as a black-box cell: its prompt form, trained by gradient.

CoOp (``whitebox.run_coop``) trains one shared text context. A black-box cell may tune a per-class or
mixed text context, visual prompts in one of three placements, or both; comparing it with CoOp compares
different prompt forms. This trains, in-process and by gradient (AdamW, cosine schedule, full batch,
the step of lowest validation loss kept, as CoOp here), exactly the tensors that cell sends the server:

- text (variants ``text`` and ``joint``): ``shared`` a context ``[n, D_text]``; ``per_class`` one per
  class ``[C, n, D_text]``; ``mixed`` the sum of a shared and a per-class part (the black-box mixed
  context is that sum, half of z each); all start at the template's words, as z = 0 does;
- vision (variants ``vision`` and ``joint``): a prompt ``[m, D_vision]`` in the cell's placement
  (``pre_ln``/``post_ln``: appended tokens before/after the pre-LayerNorm; ``add``: added to every
  position), starting at zero, as z = 0 does; with it the image features are recomputed every step
  (the tower is frozen, the prompt is not);
- deep prompts (`--depth K|all`): per tower ``[K - 1, n, D]`` replacing the prompt positions at the
  input of layers ``1 .. K - 1`` through server/deep.py's functions (the server's own placement), one
  text prompt for every class as the server takes it, starting at zero as z = 0 does. Gradient descent
  trains every layer at once: the black-box schedule (cycle or joint) and subspace restrict the search,
  not the prompt form, so one ceiling serves them all.

The vision forward is written from the public submodules of ``transformers.CLIPModel``, placing the
prompt as ``PromptedCLIP.encode_images`` does (the server runs under ``torch.inference_mode``); a test
checks them equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bptvlm.client.config import Template
from bptvlm.client.data import TaskLike
from bptvlm.server.deep import vision_hidden
from bptvlm.server.model import PromptedCLIP

from .whitebox import CoOpText, image_features, one_thread

VARIANTS = ("text", "vision", "joint")


@dataclass(frozen=True)
class PromptShape:
    """What a black-box cell tunes: which towers, the text context's form and lengths, the placement."""

    variant: str  # text | vision | joint
    text_context: str = "shared"  # shared | per_class | mixed
    n_ctx_text: int = 8
    n_ctx_vision: int = 5
    placement: str = "pre_ln"
    depths: tuple[int, int] = (1, 1)  # prompted layers (text, vision): 1 = shallow (client/deep.tower_depths)

    @property
    def text(self) -> bool:
        return self.variant in ("text", "joint")

    @property
    def vision(self) -> bool:
        return self.variant in ("vision", "joint")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"same-shape white-box: variant must be one of {VARIANTS}, received {self.variant!r}")
        if self.vision and self.depths[1] > 1 and self.placement == "add":
            raise ValueError("same-shape white-box: deep visual prompts need an appended placement (pre_ln or post_ln)")


class VisualPrompted:
    """Normalised image features ``[N, E]`` of fixed images with a trainable visual prompt ``[m, D_vision]``."""

    def __init__(self, clip: PromptedCLIP, images: np.ndarray, placement: str) -> None:
        self.vision = clip.model.vision_model
        self.projection = clip.model.visual_projection
        self.placement = placement
        with torch.no_grad():
            self.tokens = self.vision.embeddings(clip.preprocess(images).to(clip.device, clip.dtype))  # [N, T, Dv]
            if placement != "pre_ln":
                self.tokens = self.vision.pre_layrnorm(self.tokens)

    def features(self, prompt: torch.Tensor, deep: torch.Tensor | None = None) -> torch.Tensor:
        """``prompt [m, Dv]``; ``deep [Ld, m, Dv]`` replaces the appended tokens at layers ``1 .. Ld``."""
        n = self.tokens.shape[0]
        if self.placement == "add":  # one vector per position: the sequence keeps its length
            x = self.tokens + prompt.unsqueeze(0)
        else:  # appended after [CLS, patches]
            x = torch.cat([self.tokens, prompt.unsqueeze(0).expand(n, -1, -1)], dim=1)
        if self.placement == "pre_ln":
            x = self.vision.pre_layrnorm(x)
        if deep is None:
            hidden = self.vision.encoder(inputs_embeds=x).last_hidden_state
        else:
            hidden = vision_hidden(self.vision, x, deep=deep.unsqueeze(0).expand(n, -1, -1, -1))
        pooled = self.vision.post_layernorm(hidden[:, 0])
        return F.normalize(self.projection(pooled).float(), dim=-1)


class SameShape:
    """The trainable tensors of one ``PromptShape`` and the features they give on each split."""

    def __init__(self, clip: PromptedCLIP, data: TaskLike, template: Template, shape: PromptShape) -> None:
        self.shape = shape
        c = len(data.class_names)
        if shape.text:  # the context (starting at the template's words) before each class text
            self.coop = CoOpText(clip, [template.class_text(n) for n in data.class_names], shape.n_ctx_text, template.prefix)
        else:  # no context: the whole template around each name, as the black-box vision variant sends it
            self.coop = CoOpText(clip, [template.full(n) for n in data.class_names], 0)
        width, dtype = clip.limits.text_width, self.coop.init.dtype
        self.params: dict[str, torch.Tensor] = {}
        if shape.text and shape.text_context in ("shared", "mixed"):
            self.params["shared"] = torch.zeros(shape.n_ctx_text, width, dtype=dtype, requires_grad=True)
        if shape.text and shape.text_context in ("per_class", "mixed"):
            self.params["per_class"] = torch.zeros(c, shape.n_ctx_text, width, dtype=dtype, requires_grad=True)
        if shape.text and shape.depths[0] > 1:
            self.params["text_deep"] = torch.zeros(shape.depths[0] - 1, shape.n_ctx_text, width, dtype=dtype, requires_grad=True)
        if shape.vision:
            vision_width = clip.limits.vision_width
            self.params["visual"] = torch.zeros(shape.n_ctx_vision, vision_width, dtype=dtype, requires_grad=True)
            if shape.depths[1] > 1:
                self.params["visual_deep"] = torch.zeros(shape.depths[1] - 1, shape.n_ctx_vision, vision_width, dtype=dtype,
                                                         requires_grad=True)
        assert data.val_images is not None
        raw = {"train": data.train_images, "val": data.val_images, "test": data.test_images}
        if shape.vision:
            self.images: dict[str, Any] = {k: VisualPrompted(clip, x, shape.placement) for k, x in raw.items()}
        else:
            self.images = {k: image_features(clip, x) for k, x in raw.items()}
        with torch.no_grad():
            self.fixed_text = None if shape.text else self.coop.features()  # the template's class texts

    def text_features(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[C, E]``; the context is ``init + shared`` (broadcast to every class) ``+ per_class``."""
        if self.fixed_text is not None:
            return self.fixed_text
        ctx = params.get("shared")
        if "per_class" in params:
            ctx = params["per_class"] if ctx is None else ctx.unsqueeze(0) + params["per_class"]
        return self.coop.features(ctx, params.get("text_deep"))

    def image_features(self, split: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, E]`` of ``split`` (``train``, ``val``, ``test``)."""
        images = self.images[split]
        return images.features(params["visual"], params.get("visual_deep")) if self.shape.vision else images


def run_same_shape(clip: PromptedCLIP, data: TaskLike, template: Template, shape: PromptShape, *,
                   steps: int, lr: float, seed: int) -> dict[str, Any]:
    """Train ``shape``'s tensors by gradient; the step of lowest validation loss is kept and scored."""
    with one_thread():
        return _train(clip, data, template, shape, steps=steps, lr=lr, seed=seed)


def _loss_and_acc(model: SameShape, split: str, labels: torch.Tensor, scale: torch.Tensor,
                  params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    logits = scale * model.image_features(split, params) @ model.text_features(params).T
    return F.cross_entropy(logits, labels), float((logits.argmax(-1) == labels).float().mean())


def _train(clip: PromptedCLIP, data: TaskLike, template: Template, shape: PromptShape, *,
           steps: int, lr: float, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = SameShape(clip, data, template, shape)
    labels = {k: torch.as_tensor(np.asarray(y), dtype=torch.long)
              for k, y in (("train", data.train_labels), ("val", data.val_labels), ("test", data.test_labels))}
    scale = clip.model.logit_scale.detach().float().exp()
    params = model.params
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    best = (float("inf"), 0, {k: v.detach().clone() for k, v in params.items()})
    for step in range(steps + 1):
        if step % 10 == 0 or step == steps:
            with torch.no_grad():
                val_loss = float(_loss_and_acc(model, "val", labels["val"], scale, params)[0])
            if val_loss < best[0]:
                best = (val_loss, step, {k: v.detach().clone() for k, v in params.items()})
        if step == steps:
            break
        loss = _loss_and_acc(model, "train", labels["train"], scale, params)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        acc = {s: _loss_and_acc(model, s, labels[s], scale, best[2])[1] for s in ("train", "val", "test")}
    return {"val_loss": best[0], "val_accuracy": acc["val"], "test_accuracy": acc["test"], "train_accuracy": acc["train"],
            "selected": f"step {best[1]} of {steps}", "trained": sorted(params),
            "wall_s": round(time.perf_counter() - start, 3)}
