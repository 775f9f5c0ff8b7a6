"""Where the prompted vision forward spends its time: torch profiler, ops by self CPU time.

    python scripts/profile_vision.py --dtype bfloat16 --images 32 --max-batch-images 32

ViT-B/32-shaped random-weight CLIP (``random-vit-b32``) by default, one candidate of 5 visual tokens;
one warm-up forward, then one profiled forward. Prints the op table (grouped by input shape with
``--shapes``).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bptvlm.server.loading import load_model
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.precision import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-vit-b32")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-batch-images", type=int, default=32)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--shapes", action="store_true", help="group the ops by input shape")
    args = parser.parse_args()
    model = PromptedCLIP(load_model(args.model), dtype=DTYPES[args.dtype], max_batch_images=args.max_batch_images)
    lim = model.limits
    pixels = torch.randn(args.images, lim.num_channels, lim.image_size, lim.image_size).to(model.dtype)
    prompt = torch.randn(1, 5, lim.vision_width) * 0.02
    model.encode_images(pixels, prompt)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        model.encode_images(pixels, prompt)
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
