"""Provider-side commands: ``bptvlm serve`` and ``bptvlm keys``. Heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from bptvlm.shared.tensors import first_errors

    from bptvlm.server.app import create_app
    from bptvlm.server.config import Settings
    from bptvlm.server.connections import uvicorn_options
    from bptvlm.server.observability import configure_json_logging

    overrides = {
        "model": args.model,
        "model_name": args.model_name,
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "ledger": args.ledger,
        "replica_id": args.replica_id,
        "ready_probe_s": args.ready_probe_seconds,
        "api_keys": tuple(args.api_key) or None,
        "quota": args.quota,
        "requests_per_minute": args.requests_per_minute,
        "max_batch_images": args.max_batch_images,
        "compile": True if args.compile else None,
        "pack_linears": False if args.no_pack_linears else None,
        "max_queue": args.max_queue,
        "request_timeout_s": args.request_timeout,
        "max_response_bytes": args.max_response_bytes,
        "max_body_bytes": args.max_body_bytes,
        "max_image_side": args.max_image_side,
        "max_image_aspect": args.max_image_aspect,
        "metrics_token": args.metrics_token,
        "header_timeout_s": args.header_timeout,
        "body_timeout_s": args.body_timeout,
        "max_connections": args.max_connections,
        "outputs": args.outputs,
        "output_decimals": args.output_decimals,
        "output_noise": args.output_noise,
        "output_noise_seed": args.output_noise_seed,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})  # flags over BPTVLM_* env
    except ValidationError as exc:  # e.g. a postgresql:// ledger without its driver
        print(f"bptvlm serve: {first_errors(exc, limit=None)}", file=sys.stderr)
        return 2
    if args.json_logs:
        configure_json_logging(args.log_level)
    logging.getLogger().setLevel(args.log_level)
    if args.engine == "ray":
        return _serve_ray(args, settings)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level.lower(),
                **uvicorn_options(settings),
                timeout_graceful_shutdown=args.drain_seconds, log_config=None if args.json_logs else uvicorn.config.LOGGING_CONFIG)
    return 0


def _serve_ray(args: argparse.Namespace, settings: object) -> int:
    """``--engine ray``: the same app as Ray Serve replicas (server/ray_engine.py)."""
    from bptvlm.server import ray_engine

    try:
        ray_engine.require_ray()
        options = ray_engine.RayOptions(replicas=args.replicas, address=args.ray_address,
                                        gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
    except (RuntimeError, ValueError) as exc:
        print(f"bptvlm serve: {exc}", file=sys.stderr)
        return 2
    try:
        ray_engine.serve_forever(settings, options, args.host, args.port)  # type: ignore[arg-type]
    except ConnectionError as exc:  # --ray-address names no running cluster
        print(f"bptvlm serve: cannot join the Ray cluster at {args.ray_address}: {exc} (start one with "
              "`ray start --head`, or leave --ray-address out for a local Ray)", file=sys.stderr)
        return 1
    return 0


def _add_engine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (replicas behind one address)")
    g.add_argument("--engine", choices=("uvicorn", "ray"), default="uvicorn",
                   help="uvicorn: one process, one model (default); ray: --replicas copies of the same app as Ray Serve "
                   "replicas behind Ray's HTTP proxy on --host/--port, sharing one ledger (needs bptvlm[ray])")
    g.add_argument("--replicas", type=int, default=1, help="with --engine ray: replicas, each with its own model copy")
    g.add_argument("--ray-address", help="with --engine ray: join this Ray cluster ('auto': the one `ray start` "
                   "started on this host; HOST:6379: a head node) instead of starting a local one")
    g.add_argument("--gpus-per-replica", type=float, help="with --engine ray: GPUs each replica takes (default: 1 "
                   "where CUDA is present and --device is not cpu, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --engine ray: CPUs each replica takes; "
                   "Ray gives it as many torch threads (default: %(default)s; on a CPU-only host, cores / replicas)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the inference server (provider side)",
        description="Serve a frozen CLIP over the Open Inference Protocol (KServe V2). Clients send prompt "
        "tensors and images and get back only loss and logits. Without --ledger and --api-key the server "
        "runs in open local mode (no keys; it says so at start-up). Unset flags fall back to BPTVLM_* "
        "environment variables (e.g. BPTVLM_MODEL, BPTVLM_API_KEYS='[\"tok\"]'), then to the defaults.",
    )
    p.add_argument("--model", help="'tiny-random' (default; random weights, for tests), 'embedded' (the project's "
                   "own small pretrained CLIP), 'random-vit-b32' (random weights in the real ViT-B/32 shape), "
                   "a local save_pretrained CLIP directory, or a Hugging Face hub id")
    p.add_argument("--model-name", help="name under /v2/models/ (default: clip)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,  # == config.DTYPE_CHOICES (a test checks; imports stay light)
                   help="served dtype of weights, activations and caches (default auto: bfloat16 where the device "
                   "has fast bf16, i.e. CUDA with bf16 or a CPU with AVX512-BF16/AMX, else float32); scores and "
                   "loss are float32 either way; the served dtype is in the model metadata")
    p.add_argument("--seed", type=int, help="seed of the random-weight models")
    p.add_argument("--ledger", help="ledger of API keys and usage (see `bptvlm keys`): a SQLite file, or "
                   "postgresql://user@host:port/db for several replicas sharing one (needs bptvlm[postgres]); "
                   "keys are enforced and usage survives restarts")
    p.add_argument("--replica-id", help="this server's stable name in a shared ledger: restarting under the same "
                   "name frees its crashed reservations at once (default: a fresh name, freed after a lease)")
    p.add_argument("--api-key", action="append", default=[], help="also accept this bearer token (repeatable)")
    p.add_argument("--quota", type=int, help="candidates each --api-key token may evaluate (default unlimited)")
    p.add_argument("--requests-per-minute", type=int, help="rate limit of each --api-key token")
    p.add_argument("--max-batch-images", type=int, help="images through the vision tower at once (memory bound)")
    p.add_argument("--no-pack-linears", action="store_true",
                   help="on a CPU, serve the encoders' linears as the library's modules instead of oneDNN's packed, "
                   "fused form (slower; the same function)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vision and text encoders (for GPUs; off by default; start-up takes longer)")
    p.add_argument("--max-queue", type=int, help="requests allowed to wait for the model before 503 (default 64)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may wait for the model before 504")
    p.add_argument("--max-response-bytes", type=int, help="largest response; logits are P x N x C floats, a request "
                   "whose response would be larger is refused with 413 before any work (default 64 MiB)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body, after inflating gzip/deflate (default 256 MiB)")
    p.add_argument("--max-image-side", type=int, help="pixels on each side of an image (default 4096)")
    p.add_argument("--max-image-aspect", type=float, help="longest over shortest image side (default 16)")
    p.add_argument("--metrics-token", help="bearer token /metrics needs to show per-key series (default: never shown)")
    p.add_argument("--header-timeout", type=float, help="seconds a connection has to send a request's headers (default 10)")
    p.add_argument("--body-timeout", type=float, help="seconds the whole request body has to arrive, else 408 (default 60)")
    p.add_argument("--max-connections", type=int, help="open connections; more are closed at once (default 256)")
    p.add_argument("--outputs", metavar="POLICY", help="output policy: logits (default: every output), probs, loss "
                   "(the paper's: a loss per candidate only), topk:K or label; a key's own policy (`bptvlm keys "
                   "create --outputs`) can only narrow it; asking for more is 403")
    p.add_argument("--output-decimals", type=int, metavar="D", help="round every float output to D decimals")
    p.add_argument("--output-noise", type=float, metavar="S", help="std of Gaussian noise added to the logits before "
                   "any output is derived (seeded by key and request id: a retry gets the same outputs)")
    p.add_argument("--output-noise-seed", type=int, help="with key and request id, fixes the noise; keep it private "
                   "and the same across restarts (default 0)")
    p.add_argument("--ready-probe-seconds", type=float, help="when no forward pass succeeded for this long, run "
                   "a tiny one (charged to nobody) so readiness stays current (default 30; 0: never)")
    p.add_argument("--drain-seconds", type=int, default=30, help="on SIGTERM, finish in-flight requests this long")
    p.add_argument("--json-logs", action="store_true", help="structured JSON log lines with request ids")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_engine(p)
    p.set_defaults(func=_serve)


def _keys(args: argparse.Namespace) -> int:
    from bptvlm.server.ledger import Ledger

    if args.keys_command != "create" and "://" not in args.ledger and not Path(args.ledger).is_file():
        print(f"bptvlm keys: no ledger at {args.ledger} (a new one is made by `bptvlm keys create --ledger "
              f"{args.ledger} --name NAME`)", file=sys.stderr)
        return 2
    try:
        ledger = Ledger(args.ledger)
    except RuntimeError as exc:  # e.g. a postgresql:// ledger without the driver
        print(f"bptvlm keys: {exc}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            token = ledger.create_key(args.name, quota=args.quota, requests_per_minute=args.requests_per_minute,
                                      outputs=args.outputs)
            print(token)
            print(f"key {args.name!r} created; the token above is shown only now", file=sys.stderr)
        elif args.keys_command == "revoke":
            ledger.revoke(args.name)
            print(f"key {args.name!r} revoked")
        elif args.keys_command == "list":
            for k in ledger.keys():
                quota = "unlimited" if k.quota is None else k.quota
                rpm = "-" if k.requests_per_minute is None else k.requests_per_minute
                print(f"{k.name}\tquota={quota}\trpm={rpm}\t{'revoked' if k.revoked else 'active'}"
                      f"\toutputs={k.outputs or 'server'}")
        else:  # usage
            keys = [ledger.key(args.name)] if args.name else ledger.keys()
            rows = {k.name: {**ledger.usage(k).model_dump(), "remaining": ledger.remaining(k)} for k in keys}
            print(json.dumps(rows, indent=2))
    except (KeyError, ValueError) as exc:
        print(f"bptvlm keys: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    finally:
        ledger.close()
    return 0


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage API keys and quotas in a ledger (provider side)",
                       description="API keys live hashed in a ledger (a SQLite file or a postgresql:// URL) "
                       "together with what each has been charged. `bptvlm serve --ledger PATH|URL` enforces them.")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = ks.add_parser("create", help="add a key and print its token once",
                           description="Add a key; its token is printed once (only a hash is stored).")
    create.add_argument("--name", required=True)
    create.add_argument("--quota", type=int, help="candidates (queries) this key may evaluate; default unlimited")
    create.add_argument("--requests-per-minute", type=int, help="rate limit; default unlimited")
    create.add_argument("--outputs", metavar="POLICY", help="this key's output policy: logits, probs, loss, topk:K "
                        "or label (default: the server's); the stricter of it and the server's applies")
    revoke = ks.add_parser("revoke", help="refuse a key from now on", description="Refuse a key from now on.")
    revoke.add_argument("name")
    ks.add_parser("list", help="one key a line", description="List keys with quota, rate limit and state.")
    usage = ks.add_parser("usage", help="what keys have been charged (JSON)",
                          description="Candidates, requests and image forwards charged, and what remains.")
    usage.add_argument("name", nargs="?")
    for sp in (create, revoke, ks.choices["list"], usage):
        sp.add_argument("--ledger", required=True, help="the ledger: a SQLite file or a postgresql:// URL")
    p.set_defaults(func=_keys)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_serve(sub)
    _add_keys(sub)
