"""Where a joint generation's time goes inside the server: cProfile of the service layer (decode,
validation, metering, forward) without HTTP, on a worker thread as the server runs it.

    python scripts/profile_service.py [--model tiny-random] [--requests 10]

Prints the top functions by internal time (population 30, 160 images, 10 classes).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import threading

import numpy as np

from bptvlm.server.app import build_service
from bptvlm.server.config import Settings
from bptvlm.shared.tensors import HEADER_LENGTH, decode_request, encode_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    service = build_service(Settings(model=args.model, device="cpu"))
    key = service.ledger.key("anonymous")
    lim, rng = service.limits, np.random.default_rng(0)
    images = rng.integers(0, 256, (160, lim.image_size, lim.image_size, 3), dtype=np.uint8)
    batch = service.upload({"images": images}).image_batch
    inputs = {
        "text_context": (rng.standard_normal((30, 8, lim.text_width)) * lim.token_embedding_std).astype(np.float32),
        "visual_prompt": (rng.standard_normal((30, 5, lim.vision_width)) * 0.02).astype(np.float32),
        "image_batch": np.array([batch], dtype=object),
        "labels": np.repeat(np.arange(10), 16),
        "class_names": np.array([f"class {k}." for k in range(10)], dtype=object),
    }
    body, headers = encode_request(inputs, outputs=["loss"])

    def work() -> None:
        for _ in range(args.requests):
            request, arrays = decode_request(body, headers[HEADER_LENGTH])
            service.infer(request, arrays, key)

    def profiled() -> None:
        profile = cProfile.Profile()
        profile.enable()
        work()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)

    work()  # warm-up
    thread = threading.Thread(target=profiled)
    thread.start()
    thread.join()


if __name__ == "__main__":
    main()
