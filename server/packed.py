"""The encoders' linear layers in oneDNN's packed form, with the MLP's activation fused (CPU serving).

On a CPU every ``nn.Linear`` of a tower goes through a generic matrix product (MKL's, for float32)
with the bias copied into the output first, and the MLP's QuickGELU (``x * sigmoid(1.702 x)``) adds
three passes over the widest activation. :func:`pack_encoders` replaces each encoder linear by a
:class:`PackedLinear`: its weight reordered once into oneDNN's blocked layout, the bias added inside
the product (``torch.ops.mkldnn._linear_pointwise``), and in the MLP the activation as the kernel's
fused post-op:

- ``quick_gelu``: ``quick_gelu(y) = silu(a y) / a`` with ``a = 1.702``. fc1's weight and bias are
  multiplied by ``a`` and fc2's weight divided by it (in float32, before the cast to the served
  dtype); fc1 then fuses SiLU ("swish"). The MLP computes the same function.
- ``gelu``: the kernel's exact (erf) GELU.
- any other activation stays a separate module after a plain packed fc1.

Nothing else changes: layer norms, attention (SDPA) and the embeddings run as before, and so do the
shapes, dtypes and modules around the linears. The kernel has no backward, so under autograd (the
white-box baselines train prompts through these layers) a :class:`PackedLinear` runs ``F.linear`` on
its plain weight and the activation eagerly: the same function (so does ``torch.compile``'s trace, which
picks its own kernels). Each packed linear keeps that plain
copy beside the packed one, so the encoders' linear weights take twice their memory.
BENCHMARKS.md ("The CPU form of the encoders") has the measured speed-ups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUICK_GELU = 1.702  # quick_gelu(y) = y * sigmoid(1.702 y)
ROWS_HINT = 1024  # rows the packed layout is chosen for (it serves any number of rows)
EAGER_POST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda y: y,
    "swish": F.silu,
    "gelu": F.gelu,
}
ALGORITHM = {"none": "", "swish": "", "gelu": "none"}  # gelu: exact (erf), as transformers' "gelu"


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build's oneDNN has a CPU linear kernel for ``dtype`` on ``device``."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class PackedLinear(nn.Module):
    """``y = post(x W^T + b)`` for ``x [..., in]`` -> ``[..., out]`` with ``W`` packed for oneDNN.

    ``weight [out, in]`` and ``bias [out]`` are held in the served dtype; ``post`` is a oneDNN post-op
    name of :data:`EAGER_POST`. Under autograd (an input that requires grad) and under ``torch.compile`` (which
    chooses its own kernels) the eager equivalent runs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> None:
        super().__init__()
        if post not in EAGER_POST:
            raise ValueError(f"post-op must be one of {sorted(EAGER_POST)}, got {post!r}")
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(self.weight, ROWS_HINT), persistent=False)
        self.post = post
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return EAGER_POST[self.post](F.linear(x, self.weight, self.bias))
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, self.post, [], ALGORITHM[self.post])
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, post={self.post}"


def _packed(linear: nn.Linear, dtype: torch.dtype, scale: float = 1.0, post: str = "none",
            scale_bias: bool = True) -> PackedLinear:
    """``linear`` with its weight (and bias, if ``scale_bias``) multiplied by ``scale`` in float32, cast, packed."""
    weight = (linear.weight.detach().float() * scale).to(dtype)
    bias = None
    if linear.bias is not None:
        bias = (linear.bias.detach().float() * (scale if scale_bias else 1.0)).to(dtype)
    return PackedLinear(weight, bias, post)


def _pack_mlp(mlp: nn.Module, hidden_act: str, dtype: torch.dtype) -> None:
    if hidden_act == "quick_gelu":
        mlp.fc1 = _packed(mlp.fc1, dtype, QUICK_GELU, "swish")
        mlp.fc2 = _packed(mlp.fc2, dtype, 1.0 / QUICK_GELU, scale_bias=False)
        mlp.activation_fn = nn.Identity()
    elif hidden_act == "gelu":
        mlp.fc1 = _packed(mlp.fc1, dtype, post="gelu")
        mlp.fc2 = _packed(mlp.fc2, dtype)
        mlp.activation_fn = nn.Identity()
    else:
        mlp.fc1, mlp.fc2 = _packed(mlp.fc1, dtype), _packed(mlp.fc2, dtype)


def pack_encoders(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace the linears of ``model``'s (a ``CLIPModel`` on the CPU, float32 weights) text and vision
    encoder layers by packed ones in ``dtype``, in place; returns how many were replaced."""
    count = 0
    for tower in (model.text_model, model.vision_model):
        hidden_act = tower.config.hidden_act
        for layer in tower.encoder.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(attn, name, _packed(getattr(attn, name), dtype))
            _pack_mlp(layer.mlp, hidden_act, dtype)
            count += 6
    log.info("packed %d encoder linears for oneDNN (%s)", count, str(dtype).removeprefix("torch."))
    return count
