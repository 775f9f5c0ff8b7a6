"""Candidates/s with one server, Ray Serve replicas behind one address, and one client fanned out.

Everything runs at once on this host, measured side by side in alternating rounds (medians), so the
ratios hold on a shared, noisy machine:

    phase 1: uvicorn A, uvicorn B, Ray with 1 replica   -> uvicorn (1 and K clients), ray-1 (K clients),
                                                           fan-out over A,B (1 client), and the latency of
                                                           a population of one through each engine
    phase 2: Ray scaled to --replicas                   -> uvicorn (K clients) vs ray-N (K clients)

Replicas help concurrent callers (K clients, e.g. several users); fan-out splits one caller's population.
On 2 CPU cores the copies share the cores, so expect no speed-up: what shows is each engine's overhead.

    python scripts/scale_out.py                                 # this host: embedded model, CPU
    python scripts/scale_out.py --model random-vit-b32 --device cuda --replicas 2 --gpus-per-replica 1 \\
        --fanout-devices cuda:0,cuda:1 --images 160                    # a host with 2 GPUs

Prints one JSON object (every measurement, ratios) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from bptvlm.client.api import ClipClient
from bptvlm.client.fanout import FanoutClient
from bptvlm.launch import free_port, local_server
from bptvlm.shared import protocol as p


class Workload:
    """One generation: P joint candidates (text context and visual prompt) over N uploaded images."""

    def __init__(self, limits: p.PromptLimits, population: int, images: int, classes: int = 4) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (images, limits.image_size, limits.image_size, 3), dtype=np.uint8)
        self.labels = np.arange(images) % classes
        self.names = np.array([f"class {i}.".encode() for i in range(classes)], dtype=object)
        self.prompts = {p.TEXT_CONTEXT: rng.normal(0, 0.02, (population, 8, limits.text_width)).astype(np.float32),
                        p.VISUAL_PROMPT: rng.normal(0, 0.02, (population, 5, limits.vision_width)).astype(np.float32)}

    def inputs(self, client: ClipClient | FanoutClient, population: int | None = None) -> dict[str, np.ndarray]:
        prompts = {k: v[:population] for k, v in self.prompts.items()}
        return {**prompts, p.IMAGE_BATCH: np.array([client.upload_images(self.images).encode()], dtype=object),
                p.LABELS: self.labels, p.CLASS_NAMES: self.names}


def throughput(make: Callable[[], ClipClient | FanoutClient], work: Workload, clients: int, requests: int) -> float:
    """Candidates/s of ``requests`` generations sent by ``clients`` concurrent callers (each its own client)."""
    conns = [make() for _ in range(clients)]
    inputs = [work.inputs(c) for c in conns]  # uploads and a warm-up outside the clock
    for c, i in zip(conns, inputs):
        c.infer(i)
    per = [requests // clients + (k < requests % clients) for k in range(clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda c=c, i=i, n=n: [c.infer(i) for _ in range(n)])
               for c, i, n in zip(conns, inputs, per)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in conns:
        c.close()
    return requests * work.prompts[p.TEXT_CONTEXT].shape[0] / seconds


def latency(make: Callable[[], ClipClient], work: Workload, repeats: int) -> float:
    """Median seconds of a population of one (the engine's per-request overhead dominates)."""
    with make() as client:
        inputs = work.inputs(client, population=1)
        client.infer(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.infer(inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rounds(measures: dict[str, Callable[[], float]], count: int) -> dict[str, list[float]]:
    """Every measure once a round, in rotating order, ``count`` rounds."""
    results: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(count):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(measures[name]())
            print(f"  round {r + 1} {name}: {results[name][-1]:.4g}", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu", help="device of the Ray replicas and of uvicorn A")
    ap.add_argument("--fanout-devices", default="cpu,cpu", help="devices of uvicorn A and B (fan-out endpoints)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--gpus-per-replica", type=float, default=0.0)
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--clients", type=int, default=2, help="concurrent callers for the uvicorn-vs-Ray comparison")
    ap.add_argument("--requests", type=int, default=6, help="generations per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from bptvlm.server import ray_engine
    from bptvlm.server.config import Settings

    devices = args.fanout_devices.split(",")
    result: dict[str, Any] = {"args": vars(args), "cpu_count": os.cpu_count()}
    with ExitStack() as stack:
        a = stack.enter_context(local_server(args.model, args=["--device", devices[0]], timeout=300))
        b = stack.enter_context(local_server(args.model, args=["--device", devices[1]], timeout=300))
        port = free_port()
        settings = Settings(model=args.model, device=args.device)
        cpus = os.cpu_count() or 1  # each replica gets its share of the host's cores (its torch threads)
        options = ray_engine.RayOptions(replicas=1, num_cpus=cpus, cpus_per_replica=cpus,
                                        gpus_per_replica=args.gpus_per_replica)
        ray_engine.start(settings, options, "127.0.0.1", port)
        stack.callback(ray_engine.stop)
        ray = f"http://127.0.0.1:{port}"
        with ClipClient(a) as probe:
            work = Workload(probe.prompt_limits(), args.population, args.images)
        fan = lambda: FanoutClient([ClipClient(a), ClipClient(b)])  # noqa: E731
        k, n = args.clients, args.requests
        print("phase 1: uvicorn, Ray with 1 replica, fan-out over 2 uvicorn endpoints", flush=True)
        result["phase1"] = rounds({
            "uvicorn_1_client": lambda: throughput(lambda: ClipClient(a), work, 1, n),
            "fanout_2_endpoints_1_client": lambda: throughput(fan, work, 1, n),
            f"uvicorn_{k}_clients": lambda: throughput(lambda: ClipClient(a), work, k, n),
            f"ray_1_replica_{k}_clients": lambda: throughput(lambda: ClipClient(ray), work, k, n),
            "latency_uvicorn_s": lambda: latency(lambda: ClipClient(a), work, 10),
            "latency_ray_s": lambda: latency(lambda: ClipClient(ray), work, 10),
        }, args.rounds)
        print(f"phase 2: Ray scaled to {args.replicas} replicas", flush=True)
        options = ray_engine.RayOptions(replicas=args.replicas, num_cpus=cpus, cpus_per_replica=max(1, cpus // args.replicas),
                                        gpus_per_replica=args.gpus_per_replica)
        from ray import serve

        serve.delete(ray_engine.APP_NAME)  # frees the replica's CPUs (an in-place update would wait for them)
        ray_engine.start(settings, options, "127.0.0.1", port)  # the same app, with more replicas
        result["phase2"] = rounds({
            f"uvicorn_{k}_clients": lambda: throughput(lambda: ClipClient(a), work, k, n),
            f"ray_{args.replicas}_replicas_{k}_clients": lambda: throughput(lambda: ClipClient(ray), work, k, n),
        }, args.rounds)
    med = {f"{ph}.{name}": statistics.median(v) for ph in ("phase1", "phase2") for name, v in result[ph].items()}
    result["medians"] = med
    result["ratios"] = {
        "fanout_2_over_uvicorn_1_client": med["phase1.fanout_2_endpoints_1_client"] / med["phase1.uvicorn_1_client"],
        "ray_1_over_uvicorn": med[f"phase1.ray_1_replica_{k}_clients"] / med[f"phase1.uvicorn_{k}_clients"],
        f"ray_{args.replicas}_over_uvicorn": med[f"phase2.ray_{args.replicas}_replicas_{k}_clients"]
        / med[f"phase2.uvicorn_{k}_clients"],
        "ray_latency_over_uvicorn": med["phase1.latency_ray_s"] / med["phase1.latency_uvicorn_s"],
    }
    print(json.dumps(result, indent=1))
    print("\n| measurement | median |\n| --- | --- |")
    for name, value in {**med, **result["ratios"]}.items():
        print(f"| {name} | {value:.4g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
