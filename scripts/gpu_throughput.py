"""Throughput of the prompted vision forward on a GPU: images/s and achieved TFLOP/s, fp32 vs bf16.

Sized for a lent H200 session (well under 5 minutes): a ViT-B/32-shaped CLIP with random weights
(no download), population 30 x 160 images with 5 visual prompt tokens, the paper's generation.

    python scripts/gpu_throughput.py                       # on the GPU machine
    python scripts/gpu_throughput.py --device cpu --population 2 --images 8 --repeats 1   # a CPU smoke run

Prints one JSON object. FLOPs are counted analytically (matmuls only, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bptvlm.server.loading import random_vit_b32
from bptvlm.server.model import PromptedCLIP


def vision_flops_per_image(model: PromptedCLIP, prompt_tokens: int) -> float:
    cfg = model.model.config.vision_config
    d, inner, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = 1 + patches + prompt_tokens
    per_layer = 4 * tokens * d * d + 2 * tokens * d * inner + 2 * tokens * tokens * d
    patch_embed = patches * cfg.num_channels * cfg.patch_size**2 * d
    return 2.0 * (layers * per_layer + patch_embed)


def measure(dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    model = PromptedCLIP(random_vit_b32(0), device=args.device, dtype=dtype, max_batch_images=args.max_batch_images)
    size = model.limits.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, size, size, generator=gen).to(args.device)
    prompt = torch.randn(args.population, 5, model.limits.vision_width, generator=gen) * 0.02

    def step() -> torch.Tensor:
        out = model.encode_images(pixels, prompt)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        feats = step()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    images = args.population * args.images
    flops = images * vision_flops_per_image(model, 5)
    return {"seconds_per_generation": seconds, "images_per_s": images / seconds, "tflops": flops / seconds / 1e12,
            "features": feats.float().cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--population", type=int, default=30)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch-images", type=int, default=4800)
    args = parser.parse_args()
    result: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                                 "population": args.population, "images": args.images, "torch": torch.__version__}
    fp32 = measure(torch.float32, args)
    bf16 = measure(torch.bfloat16, args) if args.device.startswith("cuda") else None
    result["fp32"] = {k: v for k, v in fp32.items() if k != "features"}
    if bf16 is not None:
        result["bf16"] = {k: v for k, v in bf16.items() if k != "features"}
        result["bf16_speedup"] = fp32["seconds_per_generation"] / bf16["seconds_per_generation"]
        # Features are unit vectors: the largest cosine gap between fp32 and bf16 over all (candidate, image).
        cos = (fp32["features"] * bf16["features"]).sum(-1)
        result["bf16_max_cosine_gap"] = float((1 - cos).max())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
