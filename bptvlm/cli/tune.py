"""``bptvlm tune`` and ``bptvlm eval``: the user side of the command line.

The tuning flags are generated from ``TuneConfig`` (``common.add_config_flags``). ``bptvlm tune --resume
DIR`` continues a run from DIR/checkpoint.pkl with the run's own settings (kept in the checkpoint); a
setting given again must agree with them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from . import common
from .common import EXIT_OK, add_config_flags, add_connection, config_flags, given_config, run_command

logger = logging.getLogger(__name__)
_SOURCE_DESTS = ("data", "task", "test_fraction")  # the data flags a resumed run takes from its checkpoint


def _add_data(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("data (one of --data or --task)")
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument("--data", metavar="DIR",
                        help="ImageFolder: DIR/train/<class>/* and DIR/test/<class>/*, or DIR/<class>/* (split once, "
                        "the same for every seed); class name = folder name with '_' as space; images resized to the "
                        "server's image size")
    source.add_argument("--task", metavar="NAME", help="a built-in task of the embedded world (`bptvlm tasks list`)")
    group.add_argument("--test-fraction", type=float, default=None,
                       help="test share of a --data folder without train/test (default: 0.5)")


def add_commands(subparsers: Any) -> None:
    """Register ``tune`` and ``eval`` on the top-level parser's subparsers."""
    tune = subparsers.add_parser(
        "tune",
        help="tune prompts for a few-shot task through the API (black-box: only loss and logits come back)",
        description="Black-box prompt tuning (BPT-VLM): a search strategy proposes a low-dimensional z, a seeded "
        "random projection (kept on this side) maps it to text context vectors and visual prompt tokens, and the "
        "server returns one loss per candidate; one request per generation. Writes summary.json, progress.jsonl "
        "and prompts.safetensors to --out.",
    )
    add_connection(tune)
    _add_data(tune, required=False)  # unless --resume
    add_config_flags(tune.add_argument_group("tuning (defaults from --preset)"))
    out = tune.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="folder for summary.json, progress.jsonl, prompts.safetensors and "
                     "checkpoint.pkl (rewritten every generation); required unless --resume")
    out.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its checkpoint after a crash or Ctrl-C, with its own settings and "
                     "the same total budget, to the result an uninterrupted run gets; a finished run is only reported. "
                     "Settings given again must agree")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    tune.set_defaults(func=cmd_tune)

    ev = subparsers.add_parser(
        "eval",
        help="test accuracy of saved prompts (and zero-shot) through the API",
        description="Apply prompts.safetensors from 'bptvlm tune' to a data set's test split through the API and "
        "report tuned and zero-shot accuracy as JSON on stdout.",
    )
    add_connection(ev)
    _add_data(ev, required=True)
    ev.add_argument("--prompts", required=True, metavar="FILE", help="prompts.safetensors written by 'bptvlm tune'")
    ev.set_defaults(func=cmd_eval)


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags, kept in the checkpoint (a folder as an absolute path)."""
    source = {dest: getattr(args, dest) for dest in _SOURCE_DESTS}
    if source["data"]:
        source["data"] = str(Path(source["data"]).resolve())
    return source


def _adopt_run(args: argparse.Namespace) -> Any:
    """For --resume: load the checkpoint and take its settings into ``args``; ``ValueError`` naming
    the first flag given on the command line that disagrees with the run."""
    from bptvlm.client.checkpoint import CHECKPOINT_FILE, load_checkpoint

    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different runs; give only --resume")
    from bptvlm.client.config import TuneConfig

    checkpoint = load_checkpoint(Path(args.resume) / CHECKPOINT_FILE)
    # settings added after a run was checkpointed take the value the run had: TuneConfig's default
    known = {k: v for k, v in checkpoint.config.items() if k in config_flags()}
    stored = {**checkpoint.extra.get("source", {}), **TuneConfig(**known).to_dict()}
    flags = {**config_flags(), **{d: "--" + d.replace("_", "-") for d in _SOURCE_DESTS}}
    for dest, flag in flags.items():
        if dest not in stored:
            continue
        value, mine = getattr(args, dest), stored[dest]
        if dest == "data" and value is not None:
            value = str(Path(value).resolve())
        if value is not None and value != mine:
            raise ValueError(f"{flag} {getattr(args, dest)} contradicts the run in {args.resume} ({flag} {mine}); "
                             "leave it out to resume, or start a new run in another folder")
        setattr(args, dest, mine)
    for dest in ("endpoint", "model"):  # the server may have moved: the command line wins
        if getattr(args, dest) is None and dest in checkpoint.extra:
            setattr(args, dest, checkpoint.extra[dest])
    if not (args.data or args.task):
        raise ValueError(f"the checkpoint in {args.resume} does not record its data; give --data or --task")
    args.out = args.resume
    return checkpoint


def _print_summary(summary: dict[str, Any], out: str) -> None:
    keys = ("model", "optimizer", "budget", "train_queries", "eval_queries", "initial_train_loss",
            "best_train_loss", "zero_shot_accuracy", "test_accuracy")  # fmt: skip
    width = max(map(len, keys))
    for key in keys:
        value = summary[key]
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"{'written to':<{width}}  {out}")


def _load(args: argparse.Namespace, image_size: int, config: Any) -> Any:
    from bptvlm.data import load_data

    spec, folder = (args.task, False) if args.task else (args.data, True)
    return load_data(spec, seed=config.seed, shots=config.shots, val_shots=config.val_shots, image_size=image_size,
                     test_fraction=args.test_fraction or 0.5, folder=folder)  # fmt: skip


def cmd_tune(args: argparse.Namespace) -> int:
    """``bptvlm tune``: start (or resume) a run and print the headline numbers."""
    from bptvlm.client.config import DEFAULT_PRESET, resolve_config

    def body() -> int:
        from bptvlm.client.run import resume_tuning, run_tuning

        checkpoint, config = None, None
        if args.resume:
            checkpoint = _adopt_run(args)
            if checkpoint.done and checkpoint.summary is not None:  # finished: report, ask nothing
                logger.info("the run in %s is finished; nothing to resume", args.resume)
                _print_summary(checkpoint.summary, args.out)
                return EXIT_OK
            config = resolve_config("paper", **{k: getattr(args, k) for k in config_flags()})  # the run's own
        elif not args.out or not (args.data or args.task):
            missing = [flag for flag, value in (("--out", args.out), ("--data or --task", args.data or args.task)) if not value]
            raise ValueError(f"tune needs {' and '.join(missing)} (or --resume DIR)")
        else:
            config = resolve_config(args.preset or DEFAULT_PRESET, **given_config(args))
        args.endpoint = args.endpoint or common.DEFAULT_ENDPOINT
        with common.make_client(args) as client:
            client.wait_until_ready(args.wait)
            metadata = client.model_metadata()
            data = _load(args, client.prompt_limits(metadata).image_size, config)
            if checkpoint is not None:
                summary = resume_tuning(client, data, args.out, progress=not args.no_progress)
            else:
                extra = {"source": _source(args), "endpoint": args.endpoint, "model": args.model,
                         "preset": args.preset or DEFAULT_PRESET}
                summary = run_tuning(client, data, config, args.out, progress=not args.no_progress, extra=extra,
                                     metadata=metadata)
        _print_summary(summary, args.out)
        return EXIT_OK

    return run_command(body, args.endpoint or common.DEFAULT_ENDPOINT)


def cmd_eval(args: argparse.Namespace) -> int:
    """``bptvlm eval``: evaluate_saved, result as JSON on stdout."""

    def body() -> int:
        from bptvlm.client.evaluate import evaluate_saved
        from bptvlm.data import load_test_split

        args.endpoint = args.endpoint or common.DEFAULT_ENDPOINT
        with common.make_client(args) as client:
            client.wait_until_ready(args.wait)
            size = client.prompt_limits().image_size
            spec, folder = (args.task, False) if args.task else (args.data, True)
            data = load_test_split(spec, image_size=size, test_fraction=args.test_fraction or 0.5, folder=folder)
            print(json.dumps(evaluate_saved(client, args.prompts, data), indent=2))
        return EXIT_OK

    return run_command(body, args.endpoint or common.DEFAULT_ENDPOINT)

