"""``bptvlm perf``: what the service boundary and the batched forward cost, as ratios measured side by side.

Every ratio compares two timings taken in the same run on the same model and data (this machine is
shared and noisy, so only ratios are meaningful):

- ``http_vs_inprocess``: in-process batched generation time / the same generation through HTTP to a
  server subprocess (1.0 = the boundary is free; target >= 0.95).
- ``batched_vs_loop``: a reference-style loop (one candidate per forward, images in batches of 32,
  text padded to the full context length, nothing cached) / ours (target >= 3).
- ``textonly_vs_joint``: per-candidate time with both prompts / with a text prompt only, whose
  image features the server caches (target >= 10).
- ``micro_batch``: per-candidate time at population ``--population`` / at ``--micro-population``
  (memory bounded by ``--max-batch-images``; target >= 1: the big request is not slower per candidate).
- ``trimmed_vs_full``: text tower time padded to the full context length / trimmed after the last EOS,
  at population ``--text-population`` (default ``--population``): the text tower costs the same whatever
  the shots, so a real-size population can be timed there while the joint ratios run at reduced sizes.
- ``measured_vs_formula_chunk``: the batched joint generation with the vision chunk of the formula
  (``default_batch_images``, what ``serve`` uses on a CPU) / with the chunk the start-up measurement
  (``server/calibration.py``, opt-in: ``BPTVLM_MEASURE_CHUNKS=true``) picks (target >= 1: the
  measurement pays; only when ``--max-batch-images`` is not given).
- ``bf16_vs_fp32``, ``gemm_bf16_vs_fp32``, ``packed_vs_library`` and ``roofline_fraction``: on
  ``--dtype-model`` (default the ViT-B/32 shape), see ``bptvlm/roofline.py`` (targets >= 3 on a CPU with
  fast bf16, none: it is the hardware's bound of the first, >= 1, and >= 0.8 in bf16).

Everything in-process and the server run in the served dtype (``--dtype``, resolved as ``serve`` does).
``batched_vs_loop`` is a GPU target: on a saturated CPU the loop does the same FLOPs, so it is reported
there but not counted as missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bptvlm.client.api import ClipClient
from bptvlm.launch import local_server
from bptvlm.roofline import measure_precision
from bptvlm.server.calibration import measure_batch_images
from bptvlm.server.loading import load_model
from bptvlm.server.model import PromptedCLIP, loss_per_candidate
from bptvlm.server.precision import dtype_name, resolve_dtype

# in the report's order; None: reported, no target (gemm_bf16_vs_fp32 bounds bf16_vs_fp32: what the hardware gives)
TARGETS: dict[str, float | None] = {
    "http_vs_inprocess": 0.95, "batched_vs_loop": 3.0, "textonly_vs_joint": 10.0, "micro_batch": 1.0,
    "trimmed_vs_full": 1.0, "measured_vs_formula_chunk": 1.0, "bf16_vs_fp32": 3.0, "gemm_bf16_vs_fp32": None,
    "packed_vs_library": 1.0, "roofline_fraction": 0.8,
}
GPU_ONLY = frozenset({"batched_vs_loop"})  # reported everywhere, a target only on a GPU
REFERENCE_IMAGE_BATCH = 32


@dataclass
class Workload:
    """One generation's inputs: ``P`` candidates, ``N = shots x classes`` images, ``C`` classes."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    text_context: np.ndarray  # float32 [P, n_ctx_t, D_t]
    visual_prompt: np.ndarray  # float32 [P, n_ctx_v, D_v]


def make_workload(model: PromptedCLIP, population: int, shots: int, classes: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    lim = model.limits
    n = shots * classes
    return Workload(
        images=rng.integers(0, 256, (n, lim.image_size, lim.image_size, 3), dtype=np.uint8),
        labels=np.repeat(np.arange(classes, dtype=np.int64), shots),
        class_names=[f"class {k}." for k in range(classes)],
        text_context=(rng.standard_normal((population, 8, lim.text_width)) * lim.token_embedding_std).astype(np.float32),
        visual_prompt=(rng.standard_normal((population, 5, lim.vision_width)) * 0.02).astype(np.float32),
    )


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perf-forward")


def in_worker(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` on a worker thread, as the server runs every forward (FastAPI's threadpool).

    Seen during development: on a loaded machine the same forward ran slower on the main thread
    than on a worker thread, so comparing a main-thread forward with the server's would flatter HTTP.
    """
    return lambda: _WORKER.submit(fn).result()


def paired_seconds(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median times of ``a`` and ``b``, alternated run by run so that load from elsewhere hits both."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_seconds(a))
        times_b.append(_seconds(b))
    return statistics.median(times_a), statistics.median(times_b)


class InProcess:
    """The prompted forward without any HTTP: what a generation costs the hardware."""

    def __init__(self, model: PromptedCLIP, work: Workload) -> None:
        self.model, self.work = model, work
        self.pixels = model.preprocess(work.images)
        self.tokens = model.tokenize(work.class_names)
        self.labels = torch.from_numpy(work.labels)

    def batched(self, ctx: np.ndarray | None, prompt: np.ndarray | None) -> torch.Tensor:
        m = self.model
        vp = None if prompt is None else torch.from_numpy(prompt)
        images = m.encode_images(self.pixels, vp)
        text = m.encode_text(self.tokens, None if ctx is None else torch.from_numpy(ctx))
        return loss_per_candidate(m.logits(images, text), self.labels)

    def reference_loop(self, ctx: np.ndarray, prompt: np.ndarray) -> torch.Tensor:
        """One candidate at a time, images in batches of 32, full-length text: the research code's shape."""
        m, losses = self.model, []
        for i in range(ctx.shape[0]):
            text = m.encode_text(self.tokens, torch.from_numpy(ctx[i : i + 1]), pad_to=m.limits.context_length)
            feats = [
                m.encode_images(self.pixels[s : s + REFERENCE_IMAGE_BATCH], torch.from_numpy(prompt[i : i + 1]))
                for s in range(0, self.pixels.shape[0], REFERENCE_IMAGE_BATCH)
            ]
            losses.append(loss_per_candidate(m.logits(torch.cat(feats, dim=1), text), self.labels))
        return torch.cat(losses)

    def text_length(self, n_ctx: int) -> int:
        """Positions per class text after trimming: BOS, ``n_ctx`` context vectors, the longest name, EOS."""
        return n_ctx + 2 + max(len(ids) for ids in self.tokens.token_ids)

    def text_tower(self, ctx: np.ndarray, full: bool) -> torch.Tensor:
        pad = self.model.limits.context_length if full else None
        return self.model.encode_text(self.tokens, torch.from_numpy(ctx), pad_to=pad)


def _http_generation(client: ClipClient, batch_id: str, work: Workload, text: bool, vision: bool) -> np.ndarray:
    inputs: dict[str, np.ndarray] = {
        "image_batch": np.array([batch_id], dtype=object),
        "labels": work.labels,
        "class_names": np.array(work.class_names, dtype=object),
    }
    if text:
        inputs["text_context"] = work.text_context
    if vision:
        inputs["visual_prompt"] = work.visual_prompt
    result = client.infer(inputs)
    assert result.loss is not None
    return result.loss


def at_chunk(model: PromptedCLIP, size: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the model's vision chunk set to ``size`` images (restored afterwards)."""

    def run() -> Any:
        saved, model.max_batch_images = model.max_batch_images, size
        try:
            return fn()
        finally:
            model.max_batch_images = saved

    return run


def paired_in_worker(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    return paired_seconds(in_worker(a), in_worker(b), repeats)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    served = resolve_dtype(args.dtype, torch.device("cpu"))
    model = PromptedCLIP(load_model(args.model), dtype=served, max_batch_images=args.max_batch_images)
    formula = measured = model.max_batch_images  # the formula's chunk, as `serve` uses on a CPU
    if args.max_batch_images is None:  # what the opt-in start-up measurement would pick, for one ratio
        measured = measure_batch_images(model)
        model.max_batch_images = formula
    work = make_workload(model, args.population, args.shots, args.classes)
    local = InProcess(model, work)
    ctx, vp, r = work.text_context, work.visual_prompt, args.repeats
    batched, loop = in_worker(lambda: local.batched(ctx, vp)), in_worker(lambda: local.reference_loop(ctx, vp))
    p = args.population

    big = make_workload(model, args.micro_population, args.shots, args.classes, seed=1)
    text_p = args.text_population or p
    text_ctx = ctx if text_p == p else make_workload(model, text_p, 1, args.classes, seed=2).text_context
    t: dict[str, float] = {}
    t["loop_joint"], t["batched_joint"] = paired_seconds(loop, batched, max(1, r // 2))
    t["text_full"], t["text_trimmed"] = paired_seconds(
        in_worker(lambda: local.text_tower(text_ctx, full=True)),
        in_worker(lambda: local.text_tower(text_ctx, full=False)),
        r,
    )
    server_args = ["--max-batch-images", str(model.max_batch_images), "--dtype", dtype_name(served)]
    with local_server(args.model, args=server_args, timeout=300) as url, ClipClient(url) as client:
        batch_id = client.upload_images(work.images)
        t["inprocess_joint"], t["http_joint"] = paired_seconds(
            batched, lambda: _http_generation(client, batch_id, work, True, True), r
        )
        t["http_joint_b"], t["http_text"] = paired_seconds(
            lambda: _http_generation(client, batch_id, work, True, True),
            lambda: _http_generation(client, batch_id, work, True, False),
            r,
        )
    t["batched_joint_p30"], t["batched_joint_micro"] = paired_seconds(
        batched, in_worker(lambda: local.batched(big.text_context, big.visual_prompt)), 1
    )

    if args.max_batch_images is None:
        t["joint_formula_chunk"], t["joint_measured_chunk"] = paired_seconds(
            batched, at_chunk(model, measured, batched), r)

    prec = measure_precision(load_model(args.dtype_model), served, images=args.dtype_images,
                             population=args.dtype_population, timer=paired_in_worker, repeats=args.dtype_repeats,
                             max_batch_images=args.max_batch_images)
    t.update(prec.seconds)

    ratios = {
        "http_vs_inprocess": t["inprocess_joint"] / t["http_joint"],
        "batched_vs_loop": t["loop_joint"] / t["batched_joint"],
        "textonly_vs_joint": t["http_joint_b"] / t["http_text"],
        "micro_batch": (t["batched_joint_p30"] / p) / (t["batched_joint_micro"] / args.micro_population),
        "trimmed_vs_full": t["text_full"] / t["text_trimmed"],
        **({"measured_vs_formula_chunk": t["joint_formula_chunk"] / t["joint_measured_chunk"]}
           if "joint_formula_chunk" in t else {}),
        **prec.ratios,
    }
    setup = {
        "model": model.model_id,
        "device": str(model.device),
        "dtype": dtype_name(served),
        "population": p,
        "micro_population": args.micro_population,
        "text_population": text_p,
        "images": len(work.labels),
        "shots": args.shots,
        "classes": args.classes,
        "text_tokens": {"trimmed": int(local.text_length(text_ctx.shape[1])), "full": model.limits.context_length},
        "threads": torch.get_num_threads(),
        "repeats": r,
        "dtype_repeats": args.dtype_repeats,
        "chunks": {"formula": formula, "measured": measured},
        "precision": prec.setup,
    }
    return {**ratios, "setup": setup, "seconds": t, "targets": TARGETS, "met": targets_met(ratios, setup["device"])}


def targets_met(ratios: dict[str, float], device: str) -> dict[str, bool | None]:
    """Each ratio against its target; None for a GPU-only target measured elsewhere."""
    gpu = device.startswith("cuda")
    return {k: (None if (k in GPU_ONLY and not gpu) or target is None else ratios[k] >= target)
            for k, target in TARGETS.items() if k in ratios}


def format_report(result: dict[str, Any]) -> str:
    t, setup = result["seconds"], result["setup"]
    prec = setup.get("precision", {})
    pairs = {
        "http_vs_inprocess": ("in-process generation", "inprocess_joint", "HTTP generation", "http_joint"),
        "batched_vs_loop": ("reference loop", "loop_joint", "batched", "batched_joint"),
        "textonly_vs_joint": ("joint via HTTP", "http_joint_b", "text-only via HTTP", "http_text"),
        "micro_batch": (f"P={setup['population']}", "batched_joint_p30", f"P={setup['micro_population']}",
                        "batched_joint_micro"),
        "trimmed_vs_full": ("text, full length", "text_full", "text, trimmed", "text_trimmed"),
        "measured_vs_formula_chunk": (f"chunk {setup.get('chunks', {}).get('formula')}", "joint_formula_chunk",
                                      f"chunk {setup.get('chunks', {}).get('measured')}", "joint_measured_chunk"),
        "bf16_vs_fp32": ("vision float32", "vision_fp32", "vision bfloat16", "vision_bf16"),
        "gemm_bf16_vs_fp32": ("GEMM float32", "gemm_fp32", "GEMM bfloat16", "gemm_bf16"),
        "packed_vs_library": ("vision, library modules", "vision_library", "packed", "vision_packed"),
        "roofline_fraction": (f"GEMM {prec.get('served_dtype', '')}", "gemm_served", "vision", "vision_served"),
    }
    lines = [f"model {setup['model']} on {setup['device']} in {setup.get('dtype', 'float32')} ({setup['threads']} "
             f"threads), population {setup['population']}, {setup['images']} images, {setup['classes']} classes"]
    text_p, tokens = setup.get("text_population", setup["population"]), setup.get("text_tokens")
    if text_p != setup["population"] or tokens:
        lines.append(f"text tower (trimmed_vs_full) at population {text_p} x {setup['classes']} classes"
                     + (f", {tokens['trimmed']} vs {tokens['full']} tokens" if tokens else ""))
    if prec:
        lines.append(f"bf16_vs_fp32, roofline_fraction: {prec['model']}, {prec['images']} images x {prec['population']} "
                     f"candidates x {prec['prompt_tokens']} visual tokens, chunks {prec['max_batch_images']}; "
                     f"{prec['gflop_per_image']:.2f} GFLOP/image: {prec['achieved_gflops']:.0f} GFLOP/s vs GEMM "
                     f"{'x'.join(map(str, prec['gemm_shape']))} {prec['gemm_gflops']:.0f} GFLOP/s ({prec['served_dtype']})")
        if prec.get("bf16_skipped"):
            lines.append(f"bf16_vs_fp32, gemm_bf16_vs_fp32: not measured: {prec['bf16_skipped']}")
    lines.append("")
    lines.append(f"{'ratio':<26}{'value':>8}{'target':>8}  {'met':<4} measurements (median s)")
    met = result.get("met") or targets_met({k: result[k] for k in TARGETS if k in result}, setup["device"])
    for name in TARGETS:
        if name not in result:
            continue
        value = result[name]
        a_label, a_key, b_label, b_key = pairs[name]
        target = result["targets"][name]
        shown = "-" if target is None else {True: "yes", False: "NO", None: "GPU"}[met.get(name)]
        lines.append(f"{name:<26}{value:>8.2f}{'-' if target is None else f'{target:.2f}':>8}  {shown:<4} "
                     f"{a_label} {t[a_key]:.4f} / {b_label} {t[b_key]:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of `bptvlm perf` (flags in bptvlm.cli)."""
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
