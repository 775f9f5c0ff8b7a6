"""The vision chunk size, measured at start-up on the machine that serves instead of taken from a formula.

On a CPU the best number of images per vision-tower forward depends on the tower's width, the dtype,
the caches and the cores (BENCHMARKS.md): a short measurement finds it. Each candidate size is timed on
prompted forwards of that many images (a single candidate of ``PROMPT_TOKENS`` tokens, the paper's)
repeated for at least ``MIN_S``; :func:`measure_batch_images` describes the search. GPUs keep the
formula's large chunks (they are limited by memory, which the service's out-of-memory halving handles).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from .model import PromptedCLIP

log = logging.getLogger(__name__)

CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
PROMPT_TOKENS = 5
MIN_S = 0.15  # each timing lasts at least this long
BUDGET_S = 12.0  # the first pass stops trying larger sizes after a third of this
ROUNDS = 3
DROP = 0.85  # a size this much slower than the best so far ends the search


def images_per_second(model: PromptedCLIP, size: int, min_s: float = MIN_S, repeats: int = 2) -> float:
    """Throughput of prompted vision forwards of ``size`` images (chunks of ``size``), repeated until each of
    ``repeats`` timings lasts ``min_s`` (so that small sizes are not timed on a few milliseconds); the best."""
    lim = model.limits
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(size, lim.num_channels, lim.image_size, lim.image_size, generator=gen).to(model.dtype)
    prompt = torch.zeros(1, PROMPT_TOKENS, lim.vision_width)
    saved, model.max_batch_images = model.max_batch_images, size
    try:
        best = 0.0
        for _ in range(repeats):
            start, done = time.perf_counter(), 0
            while done == 0 or time.perf_counter() - start < min_s:
                model.encode_images(pixels, prompt)
                done += size
            best = max(best, done / (time.perf_counter() - start))
    finally:
        model.max_batch_images = saved
    return best


def measure_batch_images(
    model: PromptedCLIP, candidates: tuple[int, ...] = CANDIDATES, budget_s: float = BUDGET_S, rounds: int = ROUNDS
) -> int:
    """The fastest chunk size among ``candidates`` (ascending) on this machine, in images; also set on ``model``.

    A first pass goes up the sizes until throughput drops below ``DROP`` x the best so far or the budget
    is spent; the sizes it reached are then timed ``rounds - 1`` more times, interleaved (load from other
    processes hits them alike), and the median throughput decides. When the budget allows only one size,
    the model's chunk (the formula's) stays.
    """
    start = time.perf_counter()
    images_per_second(model, candidates[0], min_s=0.0, repeats=1)  # warm-up: first-call allocations, kernel choices
    rates: dict[int, list[float]] = {}
    for size in candidates:
        rates[size] = [images_per_second(model, size, repeats=1)]
        best = max(r[0] for r in rates.values())
        if rates[size][0] < DROP * best or time.perf_counter() - start > budget_s / rounds:
            break
    if len(rates) < 2:  # the budget ran out on the first size: nothing was compared
        log.warning("vision chunk: one size timed within %.0f s (a slow or busy machine); keeping %d images",
                    budget_s, model.max_batch_images)
        return model.max_batch_images
    for _ in range(rounds - 1):
        for size, seen in rates.items():
            seen.append(images_per_second(model, size, repeats=1))
    medians = {size: statistics.median(seen) for size, seen in rates.items()}
    chosen = max(medians, key=lambda s: medians[s])
    log.info("vision chunk of %d images measured fastest (median images/s: %s; %.1f s)", chosen,
             ", ".join(f"{s}: {r:.1f}" for s, r in medians.items()), time.perf_counter() - start)
    model.max_batch_images = chosen
    return chosen
