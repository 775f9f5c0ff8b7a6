"""``bptvlm tune`` and ``bptvlm eval``: the client side of the command line.

The top-level ``bptvlm`` parser (``bptvlm.cli``) calls ``add_commands(subparsers)``; each command's
``func(args) -> int`` is its exit code.

``bptvlm tune --resume DIR`` continues a run from DIR/checkpoint.pkl with the run's own flags (kept in
the checkpoint); a flag given again must agree with them, so options that shape the run record that
they were given (``_Given``), which a default cannot be told apart from otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bptvlm.shared.errors import BptvlmError, BudgetExhaustedError
from bptvlm.shared.protocol import DEFAULT_MODEL_NAME

from .api import ClipClient
from .checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint
from .data import DataError, FewShotData, ImageFolderDataset, TaskLike
from .projection import PLACEMENTS, TEXT_CONTEXTS
from .tuner import DEFAULT_TEMPLATE, LOSSES, VARIANTS, TuneConfig, evaluate_saved, resume_tuning, run_tuning

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUDGET = 0, 1, 2, 3
API_KEY_ENV = "BPTVLM_API_KEY"
MAX_BACKOFF_S = 10.0  # longest pause between retries: a restarted server is noticed within this
# TuneConfig fields and the data flags a resumed run takes from its checkpoint
_CONFIG_DESTS = ("optimizer", "popsize", "budget", "seed", "d_text", "d_vision", "n_ctx_text", "n_ctx_vision",
                 "sigma", "template", "loss", "visual_prompt_position", "variant", "text_context")  # fmt: skip
_SOURCE_DESTS = ("data", "task", "shots", "val_shots", "test_fraction")


class _Given(argparse.Action):
    """``store``, and note in ``namespace.given`` (dest -> flag) that the flag was on the command line."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {**getattr(namespace, "given", {}), self.dest: option_string}


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--endpoint", action=_Given, default="http://127.0.0.1:8000", help="base URL of the bptvlm server (default: %(default)s)"
    )
    group.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token for the server (default: the environment variable {API_KEY_ENV}; none for an open local server)",
    )
    group.add_argument("--model", action=_Given, default=DEFAULT_MODEL_NAME, help="model name in /v2/models/{name} (default: %(default)s)")
    group.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server to become ready (default: %(default)s)")
    group.add_argument(
        "--retry-for",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="keep retrying a request that failed to connect or got 503 (or 429 with Retry-After) for up to this "
        "long, with backoff and the same request id, so a server restart within it is survived (default: %(default)s)",
    )


def _add_data(parser: argparse.ArgumentParser, *, few_shot: bool) -> None:
    group = parser.add_argument_group("data (one of --data or --task)")
    source = group.add_mutually_exclusive_group(required=not few_shot)  # tune: unless --resume
    source.add_argument(
        "--data",
        action=_Given,
        metavar="DIR",
        help="ImageFolder: DIR/train/<class>/* and DIR/test/<class>/*, or DIR/<class>/* (split by --seed); "
        "class name = folder name with '_' as space; images resized to the server's image size",
    )
    source.add_argument("--task", action=_Given, metavar="NAME", help="a built-in task of the embedded world (bptvlm.world.tasks)")
    group.add_argument("--test-fraction", action=_Given, type=float, default=0.5, help="test share of a --data folder without train/test (default: %(default)s)")
    if few_shot:
        group.add_argument("--shots", action=_Given, type=int, default=16, help="training images per class (default: %(default)s)")
        group.add_argument(
            "--val-shots",
            action=_Given,
            type=int,
            default=0,
            help="validation images per class for --data, taken from the training images left after --shots; "
            "with a validation split the final prompt (best seen, the optimizer's recommendation or the untuned template) "
            "is chosen by validation accuracy, ties by loss (default: %(default)s)",
        )


def add_commands(subparsers: Any) -> None:
    """Register ``tune`` and ``eval`` on the top-level parser's subparsers."""
    tune = subparsers.add_parser(
        "tune",
        help="tune prompts for a few-shot task through the API (black-box: only loss and logits come back)",
        description="Black-box prompt tuning (BPT-VLM): a nevergrad optimizer searches a low-dimensional z, a seeded "
        "random projection (kept on this side) maps it to text context vectors and visual prompt tokens, and the "
        "server returns one loss per candidate; one request per generation. Writes summary.json, progress.jsonl "
        "and prompts.safetensors to --out.",
    )
    _add_connection(tune)
    _add_data(tune, few_shot=True)
    opt = tune.add_argument_group("optimizer")
    opt.add_argument("--optimizer", action=_Given, default="CMA", help="name in nevergrad's ng.optimizers.registry (e.g. CMA, DiagonalCMA, TBPSA) (default: %(default)s)")
    opt.add_argument("--popsize", action=_Given, type=int, default=30, help="candidates per generation = per request (default: %(default)s)")
    opt.add_argument("--budget", action=_Given, type=int, default=600, help="training queries (evaluated candidates); the last generation is truncated to hit it exactly (default: %(default)s)")
    opt.add_argument("--seed", action=_Given, type=int, default=0, help="seed of the few-shot sample, the projections and the optimizer (default: %(default)s)")
    prompt = tune.add_argument_group("prompts")
    prompt.add_argument("--variant", action=_Given, choices=sorted(VARIANTS), default="joint", help="which prompts to tune: text context, visual prompt, or both (default: %(default)s)")
    prompt.add_argument("--intrinsic-dim-text", action=_Given, type=int, default=500, dest="d_text", help="dimensions of z for the text context (default: %(default)s)")
    prompt.add_argument("--intrinsic-dim-vision", action=_Given, type=int, default=500, dest="d_vision", help="dimensions of z for the visual prompt (default: %(default)s)")
    prompt.add_argument("--n-ctx-text", action=_Given, type=int, default=None,
                        help="text context vectors; the first start at the template's leading words, the rest at zero "
                             "(default: 8, the paper's, or more if those words need more tokens)")
    prompt.add_argument("--n-ctx-vision", action=_Given, type=int, default=None,
                        help="visual prompt vectors (default: 5 appended tokens; one per vision position for 'add')")
    prompt.add_argument("--text-context", action=_Given, choices=TEXT_CONTEXTS, default="shared",
                        help="one text context shared by every class (shared, the paper), one per class (per_class, "
                             "CoOp's class-specific context), or both added up, half of z for each (mixed, ours) "
                             "(default: %(default)s)")
    prompt.add_argument("--sigma", action=_Given, type=float, default=1.0, help="scale of the random projections (paper's sigma) (default: %(default)s)")
    prompt.add_argument(
        "--template",
        action=_Given,
        default=None,
        help=f"hand-written prompt with one '{{}}' for the class name; its words before '{{}}' initialise the text "
        f"context (default: the task's template, else {DEFAULT_TEMPLATE!r})",
    )
    prompt.add_argument("--loss", action=_Given, choices=LOSSES, default="ce", help="training loss computed by the server (default: %(default)s)")
    prompt.add_argument(
        "--visual-prompt-position",
        action=_Given,
        choices=PLACEMENTS,
        default="pre_ln",
        help="visual prompt tokens appended before the vision pre-layer-norm (pre_ln, the paper) or after it "
        "(post_ln, ours), or one vector added to each vision position after it (add, ours: a zero prompt is no prompt) "
        "(default: %(default)s)",
    )
    out = tune.add_argument_group("output")
    out.add_argument(
        "--out", metavar="DIR", help="folder for summary.json, progress.jsonl, prompts.safetensors and checkpoint.pkl (rewritten every generation)"
    )
    out.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint after a crash or Ctrl-C, with its own flags and the same total "
        "budget, to the result an uninterrupted run gets; a finished run is only reported. Flags given again must agree",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    tune.set_defaults(func=cmd_tune, given={})

    ev = subparsers.add_parser(
        "eval",
        help="test accuracy of saved prompts (and zero-shot) through the API",
        description="Apply prompts.safetensors from 'bptvlm tune' to a data set's test split through the API and "
        "report tuned and zero-shot accuracy as JSON on stdout.",
    )
    _add_connection(ev)
    _add_data(ev, few_shot=False)
    ev.add_argument("--prompts", required=True, metavar="FILE", help="prompts.safetensors written by 'bptvlm tune'")
    ev.add_argument("--seed", type=int, default=0, help="seed of the train/test split of a --data folder without train/test")
    ev.set_defaults(func=cmd_eval)


def make_client(args: argparse.Namespace) -> ClipClient:
    """The API client the commands use (tests replace this to bind it in-process)."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return ClipClient(
        args.endpoint, api_key=api_key, model=args.model, max_retries=None, retry_for=args.retry_for, max_backoff=MAX_BACKOFF_S
    )


def _load_data(args: argparse.Namespace, image_size: int, shots: int | None) -> TaskLike:
    """Few-shot data for tuning; with ``shots=None`` (eval) only the test split of a --data folder."""
    if args.task:
        from bptvlm.world.tasks import load_task  # lazy: the world package is optional for the client

        try:
            task: TaskLike = load_task(args.task, shots=shots or 1, seed=args.seed)
        except KeyError as exc:
            raise DataError(str(exc.args[0]) if exc.args else str(exc)) from None
        return task
    dataset = ImageFolderDataset(args.data, image_size, seed=args.seed, test_fraction=args.test_fraction)
    if shots is None:
        test_images, test_labels = dataset.load("test")
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        return FewShotData(list(dataset.class_names), empty, np.zeros(0, np.int64), test_images, test_labels)
    return dataset.few_shot(shots, seed=args.seed, n_val=getattr(args, "val_shots", 0))


def _run(args: argparse.Namespace, body: Any) -> int:
    """Shared error handling: a clear one-line message and an exit code instead of a traceback."""
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))  # one line per request is noise
    try:
        with make_client(args) as client:
            client.wait_until_ready(args.wait)
            return int(body(client))
    except BudgetExhaustedError as exc:
        logger.error("query budget exhausted: %s", exc)
        return EXIT_BUDGET
    except BptvlmError as exc:
        logger.error("request failed (%d): %s", exc.status_code, exc)
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        logger.error("cannot reach %s: %s", args.endpoint, exc)
        return EXIT_FAILED
    except (DataError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE


def _config(args: argparse.Namespace) -> TuneConfig:
    return TuneConfig(**{dest: getattr(args, dest) for dest in _CONFIG_DESTS})


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags, kept in the checkpoint (a folder as an absolute path)."""
    source = {dest: getattr(args, dest) for dest in _SOURCE_DESTS}
    if source["data"]:
        source["data"] = str(Path(source["data"]).resolve())
    return source


def _adopt_run(args: argparse.Namespace) -> Checkpoint:
    """For --resume: load the checkpoint and take its flags into ``args``; ``ValueError`` naming
    the first flag given on the command line that disagrees with the run."""
    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different runs; give only --resume")
    checkpoint = load_checkpoint(Path(args.resume) / CHECKPOINT_FILE)
    # settings added after a run was checkpointed take the value the run had: TuneConfig's default
    stored = {**checkpoint.extra.get("source", {}), **asdict(TuneConfig(**checkpoint.config))}
    given: dict[str, str] = args.given
    for dest in (*_CONFIG_DESTS, *_SOURCE_DESTS):
        if dest not in stored:
            continue
        value, mine = getattr(args, dest), stored[dest]
        if dest == "data" and value is not None:
            value = str(Path(value).resolve())
        if dest in given and value != mine:
            raise ValueError(
                f"{given[dest]} {getattr(args, dest)} contradicts the run in {args.resume} "
                f"({given[dest]} {mine}); leave it out to resume, or start a new run in another folder"
            )
        setattr(args, dest, mine)
    for dest in ("endpoint", "model"):  # the server may have moved: the command line wins
        if dest not in given and dest in checkpoint.extra:
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


def cmd_tune(args: argparse.Namespace) -> int:
    """``bptvlm tune``: run_tuning (or resume_tuning) and print the headline numbers."""
    try:
        if args.resume:
            checkpoint = _adopt_run(args)
            if checkpoint.done and checkpoint.summary is not None:  # finished: report, ask nothing
                logger.info("the run in %s is finished; nothing to resume", args.resume)
                _print_summary(checkpoint.summary, args.out)
                return EXIT_OK
        elif not args.out or not (args.data or args.task):
            missing = [flag for flag, value in (("--out", args.out), ("--data or --task", args.data or args.task)) if not value]
            raise ValueError(f"tune needs {' and '.join(missing)} (or --resume DIR)")
        config = _config(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE

    def body(client: ClipClient) -> int:
        limits = client.prompt_limits()
        data = _load_data(args, limits.image_size, args.shots)
        if args.resume:
            summary = resume_tuning(client, data, args.out, progress=not args.no_progress)
        else:
            extra = {"source": _source(args), "endpoint": args.endpoint, "model": args.model}
            summary = run_tuning(client, data, config, args.out, progress=not args.no_progress, extra=extra)
        _print_summary(summary, args.out)
        return EXIT_OK

    return _run(args, body)


def cmd_eval(args: argparse.Namespace) -> int:
    """``bptvlm eval``: evaluate_saved, result as JSON on stdout."""

    def body(client: ClipClient) -> int:
        limits = client.prompt_limits()
        data = _load_data(args, limits.image_size, shots=None)
        print(json.dumps(evaluate_saved(client, args.prompts, data), indent=2))
        return EXIT_OK

    return _run(args, body)
