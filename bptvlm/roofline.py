"""The prompted vision forward against the machine's own limit, and what the served dtype buys (``bptvlm perf``).

- ``bf16_vs_fp32``: the prompted vision forward in float32 / in bfloat16, same weights, images and prompts.
- ``roofline_fraction``: achieved FLOP/s of the prompted vision forward in the served dtype / the FLOP/s of
  large matrix products in that dtype (``GEMM_SHAPE``, as many FLOPs as the forward), timed alternately in one run.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image and one candidate, with the
attention run through the math kernel (whose matrix products the counter sees; the fused CPU kernel it
does not count), times images x candidates: every op of the tower is per image, so the count is exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bptvlm.server.loading import LoadedModel
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.precision import dtype_name

GEMM_SHAPE = (4096, 1024, 1024)  # M, K, N of the reference matrix product
PROMPT_TOKENS = 5  # visual prompt tokens per candidate (the paper's)


def vision_flops(model: PromptedCLIP, prompt_tokens: int) -> int:
    """FLOPs of one image's prompted vision forward (``prompt_tokens`` appended tokens, ``pre_ln``)."""
    lim = model.limits
    pixels = torch.zeros(1, lim.num_channels, lim.image_size, lim.image_size)
    prompt = torch.zeros(1, prompt_tokens, lim.vision_width)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.encode_images(pixels, prompt)
    return int(counter.get_total_flops())


def gemm_flops() -> int:
    m, k, n = GEMM_SHAPE
    return 2 * m * k * n


def gemm(dtype: torch.dtype, device: torch.device, count: int) -> Callable[[], None]:
    """``count`` ``GEMM_SHAPE`` matrix products in ``dtype`` (inputs drawn once): as many FLOPs as the
    forward it is compared with, so that both take about as long on a machine whose load comes and goes."""
    m, k, n = GEMM_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(count):
            torch.matmul(a, b, out=out)

    return run


@dataclass
class PrecisionResult:
    """``bf16_vs_fp32`` and ``roofline_fraction`` with their timings (median s) and setup."""

    ratios: dict[str, float]
    seconds: dict[str, float]
    setup: dict[str, Any]


def measure_precision(
    loaded: LoadedModel,
    served: torch.dtype,
    *,
    images: int,
    population: int,
    timer: Callable[[Callable[[], Any], Callable[[], Any], int], tuple[float, float]],
    repeats: int,
    max_batch_images: int | None = None,
) -> PrecisionResult:
    """Time the prompted vision forward of ``loaded`` in float32 and bfloat16 (and ``served``, if neither),
    then the served dtype's forward against its GEMM: ``images`` seeded random images, ``population``
    candidates of ``PROMPT_TOKENS`` visual tokens, the same in every dtype; ``timer(a, b, repeats)`` gives
    the two median times, alternated run by run."""
    dtypes = list(dict.fromkeys([torch.float32, torch.bfloat16, served]))
    # each dtype at the chunk `serve` uses (the formula's, unless given)
    models = {d: PromptedCLIP(copy.deepcopy(loaded), dtype=d, max_batch_images=max_batch_images) for d in dtypes}
    lim, rng = models[torch.float32].limits, np.random.default_rng(3)
    pixels = rng.integers(0, 256, (images, lim.image_size, lim.image_size, 3), dtype=np.uint8)
    prompt = torch.from_numpy((rng.standard_normal((population, PROMPT_TOKENS, lim.vision_width)) * 0.02).astype(np.float32))
    forwards = {d: _forward(m, m.preprocess(pixels), prompt) for d, m in models.items()}
    t: dict[str, float] = {}
    t["vision_fp32"], t["vision_bf16"] = timer(forwards[torch.float32], forwards[torch.bfloat16], repeats)
    model = models[served]
    per_image = vision_flops(model, prompt.shape[1])
    work = per_image * images * population
    products = max(1, round(work / gemm_flops()))
    t["gemm_served"], t["vision_served"] = timer(gemm(served, model.device, products), forwards[served], repeats)
    achieved, limit = work / t["vision_served"], products * gemm_flops() / t["gemm_served"]
    setup = {
        "model": model.model_id,
        "served_dtype": dtype_name(served),
        "images": images,
        "population": population,
        "prompt_tokens": PROMPT_TOKENS,
        "max_batch_images": {dtype_name(d): m.max_batch_images for d, m in models.items()},
        "gflop_per_image": per_image / 1e9,
        "gemm_shape": list(GEMM_SHAPE),
        "gemm_products": products,
        "achieved_gflops": achieved / 1e9,
        "gemm_gflops": limit / 1e9,
    }
    ratios = {"bf16_vs_fp32": t["vision_fp32"] / t["vision_bf16"], "roofline_fraction": achieved / limit}
    return PrecisionResult(ratios, t, setup)


def _forward(model: PromptedCLIP, pixels: torch.Tensor, prompt: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: model.encode_images(pixels, prompt)
