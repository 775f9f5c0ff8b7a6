"""``bptvlm``: one command line for both sides. ``serve`` runs the provider; ``tune``/``eval`` the user.

One module per command family in this package (``serve`` (serve, keys), ``tune`` (tune, eval), ``bench``,
``world`` (tasks, model); ``common`` holds the
exit codes, error mapping, client factory and config-generated flags); this module assembles them.
Commands import lazily, so ``bptvlm tune`` never loads server code and ``bptvlm serve`` never loads
the optimizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _perf(args: argparse.Namespace) -> int:
    from bptvlm.perf import run

    return run(args)


def _add_perf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perf",
        help="measure the boundary's cost and the batched forward's speed-ups",
        description="Print ratios of two timings taken side by side in one run on the same model and data: "
        "http_vs_inprocess (target >= 0.95), batched_vs_loop (>= 3 on a GPU), textonly_vs_joint (>= 10), micro_batch "
        "(>= 1), trimmed_vs_full, bf16_vs_fp32 (>= 3) and roofline_fraction (>= 0.8). A server subprocess on 127.0.0.1 serves the HTTP side. Definitions in "
        "bptvlm/perf.py.",
    )
    p.add_argument("--model", default="embedded",
                   help="model spec as for `serve` (embedded, tiny-random, random-vit-b32, a directory)")
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--micro-population", type=int, default=1000, help="population of the micro-batching check")
    p.add_argument("--text-population", type=int,
                   help="population of the trimmed_vs_full text-tower timing (default: --population); the text "
                   "tower's cost does not depend on --shots, so it can run at full size while the joint "
                   "ratios run at reduced sizes on a slow machine")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--max-batch-images", type=int, help="vision chunk size (default: the server's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="served dtype, in-process and of the server (default auto, as for `serve`)")
    p.add_argument("--dtype-model", default="random-vit-b32",
                   help="model of bf16_vs_fp32 and roofline_fraction (default: the ViT-B/32 shape, random weights)")
    p.add_argument("--dtype-images", type=int, default=32, help="images of the bf16_vs_fp32/roofline forward")
    p.add_argument("--dtype-population", type=int, default=1, help="candidates of that forward (5 visual tokens each)")
    p.add_argument("--dtype-repeats", type=int, default=7,
                   help="timed repeats of each of those (short) timings: more than --repeats, since each lasts about a second")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_perf)


def _demo(args: argparse.Namespace) -> int:
    from bptvlm.demo import run

    return run(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .common import add_config_flags

    p = sub.add_parser(
        "demo",
        help="serve the embedded CLIP and tune the task suite: zero-shot vs tuned",
        description="Start `bptvlm serve --model embedded` as a subprocess, tune prompts for each suite task "
        "through the API (black-box: only loss and logits come back), and print zero-shot vs tuned test "
        "accuracy per task with the queries spent and the wall time. Writes demo.md, demo.json and demo.png "
        "under --out. Tuning settings as for `bptvlm tune` (default preset: the best measured on the suite).",
    )
    p.add_argument("--model", default="embedded", help="model spec for the server (default: embedded)")
    p.add_argument("--tasks", help="comma-separated task names (default: the suite, every task `bptvlm tasks list` "
                   "marks 'suite')")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the table averages over them (default: %(default)s)")
    add_config_flags(p.add_argument_group("tuning (defaults from --preset)"), skip=("seed", "dataset", "data_root", "protocol"))
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)


def _compare(args: argparse.Namespace) -> int:
    from .common import run_command

    def body() -> int:
        from bptvlm.compare import compare

        text, png = compare(args.runs, args.out)
        print(text)
        print(f"\ncurves: {png}" if png else "\n(--out DIR also writes the table and the overlaid curves as PNG)")
        return 0

    return run_command(body)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="runs side by side: what differs, zero-shot vs tuned, queries, wall; overlaid curves",
        description="Read the run folders of `bptvlm tune` (summary.json, progress.jsonl) and print a table: the "
        "settings that differ between them, zero-shot and tuned test accuracy, the prompt selected, training and "
        "evaluation queries, wall seconds. With --out, also OUT/compare.md and OUT/compare.png: best training loss "
        "and validation accuracy of the best-so-far prompt against training queries, one colour per run (dashed: "
        "each run's untuned template on validation).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `bptvlm tune --out`")
    p.add_argument("--out", metavar="DIR", help="folder for compare.md and compare.png (default: print the table only)")
    p.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bptvlm",
        description="Black-box prompt tuning of CLIP as a service (BPT-VLM). The server hosts a frozen CLIP "
        "and returns only loss and logits; the client tunes text and visual prompts with Nevergrad "
        "optimizers in a random low-dimensional subspace it keeps to itself, paying one query per "
        "evaluated candidate.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        parser.add_argument("--version", action="version", version=f"bptvlm {version('bptvlm')}")
    except PackageNotFoundError:  # running from a source tree that was never installed
        pass
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import serve

    serve.add_commands(sub)
    from . import bench, tune, world

    tune.add_commands(sub)
    world.add_commands(sub)
    bench.add_commands(sub)
    _add_compare(sub)
    _add_demo(sub)
    _add_perf(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in summary.json
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
