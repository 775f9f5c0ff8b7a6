"""The prompted vision forward against the machine's own limit, and what the served dtype buys (``bptvlm perf``).

- ``bf16_vs_fp32``: the prompted vision forward in float32 / in bfloat16, same weights, images and prompts,
  each in the served form (the encoders' linears packed for oneDNN where the CPU has it, server/packed.py).
  Only where the device has fast bf16 or bf16 is served: a CPU without AVX512-BF16/AMX emulates it
  (a 4096x1024x1024 product ran at 0.65 GFLOP/s against 121 in float32 on an AVX2 EPYC), so timing it
  would take the run's whole budget to say what ``--dtype auto`` already knows.
- ``gemm_bf16_vs_fp32``: the same for large matrix products (``GEMM_SHAPE``): what the hardware gives bf16
  over float32 at best, so the bound of ``bf16_vs_fp32`` (reported, no target).
- ``packed_vs_library``: the served dtype's forward with the library's own modules / in the served form
  (target >= 1: the packing pays; only where packing is available).
- ``roofline_fraction``: achieved FLOP/s of the prompted vision forward in the served dtype / the FLOP/s of
  large matrix products in that dtype (as many FLOPs as the forward), timed alternately in one run. The
  products run with the faster of two kernels, timed side by side: ``torch.matmul`` and oneDNN's packed
  linear (the served form's kernel; float32 ``matmul`` goes to MKL, which on some CPUs is much slower).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image and one candidate, with the
attention run through the math kernel (whose matrix products the counter sees; the fused CPU kernel it
does not count), times images x candidates: every op of the tower is per image, so the count is exact.
The packed linears' kernel is counted as the matrix product it is (``2 x rows x in x out``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bptvlm.server.loading import LoadedModel
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.packed import ROWS_HINT, packing_available
from bptvlm.server.precision import dtype_name, has_fast_bf16

Timer = Callable[[Callable[[], Any], Callable[[], Any], int], tuple[float, float]]
GEMM_SHAPE = (4096, 1024, 1024)  # M, K, N of the reference matrix product
PROMPT_TOKENS = 5  # visual prompt tokens per candidate (the paper's)


def _packed_linear_flops(x_shape: torch.Size, w_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``torch.ops.mkldnn._linear_pointwise``: ``x [rows, in]`` times ``W [out, in]``."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


PACKED_FLOPS = {torch.ops.mkldnn._linear_pointwise: _packed_linear_flops}


def vision_flops(model: PromptedCLIP, prompt_tokens: int) -> int:
    """FLOPs of one image's prompted vision forward (``prompt_tokens`` appended tokens, ``pre_ln``)."""
    lim = model.limits
    pixels = torch.zeros(1, lim.num_channels, lim.image_size, lim.image_size)
    prompt = torch.zeros(1, prompt_tokens, lim.vision_width)
    with FlopCounterMode(display=False, custom_mapping=PACKED_FLOPS) as counter, sdpa_kernel(SDPBackend.MATH):
        model.encode_images(pixels, prompt)
    return int(counter.get_total_flops())


def gemm_flops() -> int:
    m, k, n = GEMM_SHAPE
    return 2 * m * k * n


def gemm(dtype: torch.dtype, device: torch.device, count: int, packed: bool = False) -> Callable[[], None]:
    """``count`` ``GEMM_SHAPE`` matrix products in ``dtype`` (inputs drawn once): as many FLOPs as the
    forward it is compared with, so that both take about as long on a machine whose load comes and goes.
    ``packed``: through oneDNN's packed linear (the served form's kernel) instead of ``torch.matmul``."""
    m, k, n = GEMM_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    if packed:
        weight = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), ROWS_HINT)  # [n, k]

        def run_packed() -> None:
            for _ in range(count):
                torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")

        return run_packed
    out = torch.empty(m, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(count):
            torch.matmul(a, b, out=out)

    return run


def best_gemm(dtype: torch.dtype, device: torch.device, count: int, timer: Timer, repeats: int
              ) -> tuple[Callable[[], None], dict[str, float]]:
    """The faster GEMM kernel for ``dtype`` (``torch.matmul`` or, where available, oneDNN's packed
    linear), timed side by side; with each kernel's median seconds."""
    plain = gemm(dtype, device, count)
    if not packing_available(device, dtype):
        return plain, {"matmul": timer(plain, plain, 1)[0]}
    fast = gemm(dtype, device, count, packed=True)
    seconds = dict(zip(("matmul", "packed"), timer(plain, fast, repeats)))
    return (fast if seconds["packed"] <= seconds["matmul"] else plain), seconds


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
    timer: Timer,
    repeats: int,
    max_batch_images: int | None = None,
    compare_bf16: bool | None = None,
) -> PrecisionResult:
    """Time the prompted vision forward of ``loaded`` in float32 and bfloat16 (and ``served``, if neither),
    each in the served form; the served dtype's forward with the library's modules; and the served
    dtype's forward against its best GEMM: ``images`` seeded random images, ``population`` candidates of
    ``PROMPT_TOKENS`` visual tokens, the same everywhere; ``timer(a, b, repeats)`` gives the two median
    times, alternated run by run. ``compare_bf16`` (default: where the device has fast bf16 or bf16 is
    served) times the bf16 sides of ``bf16_vs_fp32`` and ``gemm_bf16_vs_fp32``; without it they are left
    out and ``setup["bf16_skipped"]`` says why."""
    device = torch.device("cpu")
    if compare_bf16 is None:
        compare_bf16 = has_fast_bf16(device) or served == torch.bfloat16
    compared = (torch.float32, torch.bfloat16) if compare_bf16 else (torch.float32,)
    dtypes = list(dict.fromkeys([*compared, served]))
    # each dtype at the chunk `serve` uses (the formula's, unless given), in the form `serve` uses
    models = {d: PromptedCLIP(copy.deepcopy(loaded), dtype=d, max_batch_images=max_batch_images) for d in dtypes}
    model = models[served]
    lim, rng = model.limits, np.random.default_rng(3)
    pixels = rng.integers(0, 256, (images, lim.image_size, lim.image_size, 3), dtype=np.uint8)
    prompt = torch.from_numpy((rng.standard_normal((population, PROMPT_TOKENS, lim.vision_width)) * 0.02).astype(np.float32))
    forwards = {d: _forward(m, m.preprocess(pixels), prompt) for d, m in models.items()}
    t: dict[str, float] = {}
    if compare_bf16:
        t["vision_fp32"], t["vision_bf16"] = timer(forwards[torch.float32], forwards[torch.bfloat16], repeats)
    if model.packed:
        library = PromptedCLIP(copy.deepcopy(loaded), dtype=served, max_batch_images=max_batch_images, pack=False)
        t["vision_library"], t["vision_packed"] = timer(_forward(library, library.preprocess(pixels), prompt),
                                                        forwards[served], repeats)
        del library
    per_image = vision_flops(model, prompt.shape[1])
    work = per_image * images * population
    products = max(1, round(work / gemm_flops()))
    kernels: dict[str, dict[str, float]] = {}
    fastest: dict[torch.dtype, Callable[[], None]] = {}
    for d in dtypes:  # the hardware's bf16 over float32 and the served dtype's limit, each at its best kernel
        fastest[d], kernels[dtype_name(d)] = best_gemm(d, device, products, timer, repeats)
    t["gemm_served"], t["vision_served"] = timer(fastest[served], forwards[served], repeats)
    best = {name: min(s.values()) for name, s in kernels.items()}
    t["gemm_fp32"] = best["float32"]
    achieved, limit = work / t["vision_served"], products * gemm_flops() / t["gemm_served"]
    setup = {
        "model": model.model_id,
        "served_dtype": dtype_name(served),
        "packed": {dtype_name(d): m.packed for d, m in models.items()},
        "images": images,
        "population": population,
        "prompt_tokens": PROMPT_TOKENS,
        "max_batch_images": {dtype_name(d): m.max_batch_images for d, m in models.items()},
        "gflop_per_image": per_image / 1e9,
        "gemm_shape": list(GEMM_SHAPE),
        "gemm_products": products,
        "gemm_kernel_seconds": kernels,
        "achieved_gflops": achieved / 1e9,
        "gemm_gflops": limit / 1e9,
    }
    ratios = {"roofline_fraction": achieved / limit}
    if compare_bf16:
        t["gemm_bf16"] = best["bfloat16"]
        ratios["bf16_vs_fp32"] = t["vision_fp32"] / t["vision_bf16"]
        ratios["gemm_bf16_vs_fp32"] = t["gemm_fp32"] / t["gemm_bf16"]
    else:
        setup["bf16_skipped"] = "this device has no fast bf16 (AVX512-BF16/AMX on a CPU): it would be emulated"
    if "vision_packed" in t:
        ratios["packed_vs_library"] = t["vision_library"] / t["vision_packed"]
    return PrecisionResult(ratios, t, setup)


def _forward(model: PromptedCLIP, pixels: torch.Tensor, prompt: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: model.encode_images(pixels, prompt)
