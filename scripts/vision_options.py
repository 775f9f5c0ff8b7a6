"""Options for the prompted vision forward, timed side by side: eager, torch.compile, freezing, attention kernels,
and the library's own modules (``library``) against the served form (``eager``: linears packed on a CPU).

    python scripts/vision_options.py --dtype bfloat16 --images 64 --max-batch-images 32 --rounds 5

Every variant gets its own copy of the same random-weight model (``random-vit-b32`` by default), the same
images and the same ``--population`` candidates of 5 visual tokens; ``name@N`` runs a variant in chunks
of N images. Each is called twice first (compiling where it compiles; the
time is printed), then the variants are timed in interleaved rounds (load from other processes hits them
alike) and the medians compared with eager.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from bptvlm.server.loading import LoadedModel, load_model
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.precision import DTYPES


def _eager_attention(model: PromptedCLIP) -> None:
    model.model.vision_model.config._attn_implementation = "eager"


def _compile(**kwargs: object) -> Callable[[PromptedCLIP], None]:
    return lambda model: model.model.vision_model.encoder.compile(**kwargs)  # type: ignore[arg-type]


VARIANTS: dict[str, Callable[[PromptedCLIP], None]] = {
    "eager": lambda model: None,
    "library": lambda model: None,  # built with pack=False: the library's nn.Linear modules
    "eager-attention": _eager_attention,
    "compile-dynamic": _compile(dynamic=True),
    "compile-dynamic-freezing": _compile(dynamic=True, options={"freezing": True}),
    "compile-static-freezing": _compile(dynamic=False, options={"freezing": True}),
}


def build(loaded: LoadedModel, name: str, dtype: torch.dtype, chunk: int) -> PromptedCLIP:
    """``name`` is a VARIANTS key, optionally ``@N`` for chunks of N images instead of ``chunk``."""
    base, _, size = name.partition("@")
    model = PromptedCLIP(copy.deepcopy(loaded), dtype=dtype, max_batch_images=int(size) if size else chunk,
                         pack=False if base == "library" else None)
    VARIANTS[base](model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-vit-b32")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-batch-images", type=int, default=32)
    parser.add_argument("--population", type=int, default=1, help="candidates, 5 visual tokens each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="eager,compile-dynamic,compile-dynamic-freezing",
                        help=f"comma-separated, first is the baseline; from {', '.join(VARIANTS)}, each optionally "
                        "@N for chunks of N images (e.g. eager@256,eager@512)")
    args = parser.parse_args()
    names = args.variants.split(",")
    loaded, dtype = load_model(args.model), DTYPES[args.dtype]
    models: dict[str, PromptedCLIP] = {}
    lim = PromptedCLIP(copy.deepcopy(loaded)).limits
    pixels = torch.randn(args.images, lim.num_channels, lim.image_size, lim.image_size).to(dtype)
    prompt = torch.randn(args.population, 5, lim.vision_width) * 0.02
    for name in names:
        models[name] = build(loaded, name, dtype, args.max_batch_images)
        start = time.perf_counter()
        models[name].encode_images(pixels[: max(1, args.images * 3 // 8)], prompt)  # a second shape as well
        models[name].encode_images(pixels, prompt)
        print(f"{name}: first two calls {time.perf_counter() - start:.1f} s", flush=True)
    reference = models[names[0]].encode_images(pixels, prompt).float()
    for name, model in models.items():
        gap = (model.encode_images(pixels, prompt).float() - reference).abs().max().item()
        print(f"{name}: max |feature difference| vs {names[0]} {gap:.2e}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.encode_images(pixels, prompt)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times[names[0]])
    for name, seen in times.items():
        med = statistics.median(seen)
        print(f"{name:<26} median {med:7.3f} s  {args.images * args.population / med:7.1f} images/s  speed-up vs {names[0]} {base / med:5.2f}"
              f"  (rounds: {', '.join(f'{s:.2f}' for s in seen)})")


if __name__ == "__main__":
    main()
