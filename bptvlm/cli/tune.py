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
from .common import EXIT_INTERRUPTED, EXIT_OK, add_config_flags, add_connection, config_flags, given_config, run_command

logger = logging.getLogger(__name__)
_SOURCE_DESTS = ("data", "task", "test_fraction")  # the data flags a resumed run takes from its checkpoint


def _add_data(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("data (one of --data, --task or --dataset)")
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
    group = tune.add_argument_group("tuning (defaults from --preset)")
    group.add_argument("--config", metavar="FILE.toml", type=Path,
                       help="settings from a TOML file, with the flags' names ('_' for '-', e.g. budget = 600, "
                       "intrinsic_dim_text or d_text, data = \"pets\"); flags given on the command line override it")
    add_config_flags(group)
    out = tune.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="REQUIRED unless --resume: a new or empty folder for summary.json, "
                     "progress.jsonl, curves.png, prompts.safetensors and checkpoint.pkl (rewritten every generation)")
    out.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse a non-empty --out)")
    out.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its checkpoint after a crash, Ctrl-C or a spent quota, with its own "
                     "settings, to the result an uninterrupted run gets; a finished run is only reported, unless a larger "
                     "--budget extends it from the saved strategy. Other settings given again must agree")
    out.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files (loss, validation accuracy, "
                     "queries; the config as hparams) to DIR (needs: pip install 'bptvlm[tracking]')")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (it is also off when stderr is not a terminal)")
    tune.set_defaults(func=cmd_tune)

    ev = subparsers.add_parser(
        "eval",
        help="test accuracy of saved prompts (and zero-shot) through the API",
        description="Apply prompts.safetensors from 'bptvlm tune' to a data set's test split through the API and "
        "report tuned and zero-shot accuracy as JSON on stdout.",
    )
    add_connection(ev)
    _add_data(ev, required=False)
    _add_dataset_flags(ev)
    ev.add_argument("--prompts", required=True, metavar="FILE",
                    help="REQUIRED: prompts.safetensors written by 'bptvlm tune' (or its run folder)")
    ev.add_argument("--force", action="store_true", help="apply prompts tuned on another model than the served one "
                    "(default: refuse; they are not meant for it)")
    ev.set_defaults(func=cmd_eval)


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--data-root`` for ``eval`` (in ``tune`` they come from ``TuneConfig``), same help."""
    from dataclasses import fields

    from bptvlm.client.config import TuneConfig

    helps = {f.name: f.metadata["help"] for f in fields(TuneConfig)}
    parser.add_argument("--dataset", metavar="NAME", help=helps["dataset"] + "; cross-data-set transfer: prompts "
                        "tuned on one benchmark, tested on another")
    parser.add_argument("--data-root", dest="data_root", metavar="DIR", help=helps["data_root"])


def _spec(args: argparse.Namespace) -> tuple[str, bool | None]:
    """(data source, folder?) of --task, --data or --dataset; ``ValueError`` unless exactly one is given."""
    given = [(flag, v) for flag, v in (("--data", args.data), ("--task", args.task), ("--dataset", args.dataset)) if v]
    if len(given) != 1:
        raise ValueError(f"give one of --data, --task or --dataset, not {' and '.join(f for f, _ in given)}" if given
                         else "give the data: --data DIR, --task NAME or --dataset NAME")
    return (args.task, False) if args.task else (args.data, True) if args.data else (args.dataset, False)


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags, kept in the checkpoint (a folder as an absolute path)."""
    source = {dest: getattr(args, dest) for dest in _SOURCE_DESTS}
    if source["data"]:
        source["data"] = str(Path(source["data"]).resolve())
    return source


_FILE_KEYS = ("preset", "data", "task", "test_fraction", "out", "endpoint", "served_model", "tensorboard")


def apply_config_file(args: argparse.Namespace) -> None:
    """Fill every setting not given on the command line from ``args.config`` (TOML, the flags' names)."""
    if not args.config:
        return
    import tomllib

    try:
        with Path(args.config).open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {args.config} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {args.config} is not valid TOML: {exc}") from None
    aliases = {flag.lstrip("-").replace("-", "_"): dest for dest, flag in config_flags().items()}
    allowed = {**{d: d for d in (*config_flags(), *_FILE_KEYS)}, **aliases}
    for key, value in values.items():
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; keys are {', '.join(sorted(allowed))}"
            raise ValueError(f"--config {args.config}: unknown key {key!r}{hint}")
        if getattr(args, allowed[key], None) is None:
            setattr(args, allowed[key], value)


def _adopt_run(args: argparse.Namespace) -> Any:
    """For --resume: load the checkpoint and take its settings into ``args`` (a larger --budget extends
    the run); ``ValueError`` naming the first flag given on the command line that disagrees with it."""
    from bptvlm.client.checkpoint import CHECKPOINT_FILE, load_checkpoint

    if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different runs; give only --resume")
    from bptvlm.client.config import TuneConfig

    checkpoint = load_checkpoint(Path(args.resume) / CHECKPOINT_FILE)
    # settings added after a run was checkpointed take the value the run had: TuneConfig's default
    known = {k: v for k, v in checkpoint.config.items() if k in config_flags()}
    stored = {**checkpoint.extra.get("source", {}), **TuneConfig(**known).to_dict()}
    flags = {**config_flags(), **{d: "--" + d.replace("_", "-") for d in _SOURCE_DESTS}}
    args.extend_to = None
    if args.budget is not None and args.budget > stored["budget"]:
        args.extend_to, args.budget = args.budget, None
    for dest, flag in flags.items():
        if dest not in stored:
            continue
        value, mine = getattr(args, dest), stored[dest]
        if dest == "data" and value is not None:
            value = str(Path(value).resolve())
        if value is not None and value != mine:
            extra = "; only a larger --budget extends it" if dest == "budget" else ""
            raise ValueError(f"{flag} {getattr(args, dest)} contradicts the run in {args.resume} ({flag} {mine}){extra}; "
                             "leave it out to resume, or start a new run in another folder")
        setattr(args, dest, mine)
    for dest, key in (("endpoint", "endpoint"), ("served_model", "model")):  # the server may have moved: the command line wins
        if getattr(args, dest) is None and key in checkpoint.extra:
            setattr(args, dest, checkpoint.extra[key])
    if not (args.data or args.task or args.dataset):
        raise ValueError(f"the checkpoint in {args.resume} does not record its data; give --data, --task or --dataset")
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

    spec, folder = _spec(args)
    return load_data(spec, seed=config.seed, shots=config.shots, val_shots=config.val_shots, image_size=image_size,
                     test_fraction=args.test_fraction or 0.5, folder=folder, data_root=config.data_root)  # fmt: skip


def _clear_run(out: Path) -> None:
    """--overwrite: remove what a run writes in ``out`` (nothing else)."""
    from bptvlm.client.artifacts import PROGRESS_FILE, PROMPTS_FILE, SUMMARY_FILE
    from bptvlm.client.checkpoint import CHECKPOINT_FILE
    from bptvlm.client.tracking import CURVES_FILE

    for name in (SUMMARY_FILE, PROGRESS_FILE, PROMPTS_FILE, CHECKPOINT_FILE, CURVES_FILE):
        (out / name).unlink(missing_ok=True)
    left = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if left:
        logger.warning("--overwrite: %s also holds %s, left as they are", out, ", ".join(left[:5]))


def _local_checks(args: argparse.Namespace) -> Any:
    """Everything checkable without the server, before waiting for it; the resolved config."""
    from bptvlm.client.config import DEFAULT_PRESET, resolve_config
    from bptvlm.data import check_source

    source = args.data or args.task or args.dataset
    if not args.out or not source:
        missing = [flag for flag, value in (("--out", args.out), ("--data, --task or --dataset", source)) if not value]
        raise ValueError(f"tune needs {' and '.join(missing)} (or --resume DIR)")
    config = resolve_config(args.preset or DEFAULT_PRESET, **given_config(args))
    common.check_out(args.out, overwrite=args.overwrite)
    spec, folder = _spec(args)
    check_source(spec, folder=folder, data_root=config.data_root)
    return config


def cmd_tune(args: argparse.Namespace) -> int:
    """``bptvlm tune``: start (or resume, or extend) a run and print the headline numbers; 130 after a
    Ctrl-C (what was found is evaluated and saved first), 3 when the key's quota ran out."""

    def body() -> int:
        from bptvlm.client.config import DEFAULT_PRESET, resolve_config
        from bptvlm.client.run import resume_tuning, run_tuning
        from bptvlm.data import check_source

        apply_config_file(args)
        common.check_endpoint(args.endpoint or common.DEFAULT_ENDPOINT)
        checkpoint, config = None, None
        if args.resume:
            checkpoint = _adopt_run(args)
            if checkpoint.done and checkpoint.summary is not None and args.extend_to is None:  # finished: report
                logger.info("the run in %s is finished; nothing to resume (a larger --budget extends it)", args.resume)
                _print_summary(checkpoint.summary, args.out)
                return EXIT_OK
            config = resolve_config("paper", **{k: getattr(args, k) for k in config_flags()})  # the run's own
            spec, folder = _spec(args)
            check_source(spec, folder=folder, data_root=config.data_root)
        else:
            config = _local_checks(args)
        args.endpoint = args.endpoint or common.DEFAULT_ENDPOINT
        with common.make_client(args) as client:
            common.connect(client, args.wait)
            metadata = client.model_metadata()
            data = _load(args, client.prompt_limits(metadata).image_size, config)
            if checkpoint is not None:
                summary = resume_tuning(client, data, args.out, progress=not args.no_progress, budget=args.extend_to,
                                        tensorboard=args.tensorboard)  # fmt: skip
            else:
                if args.overwrite:
                    _clear_run(Path(args.out))
                extra = {"source": _source(args), "endpoint": args.endpoint, "model": args.served_model,
                         "preset": args.preset or DEFAULT_PRESET, "command": common.command_line(args)}
                summary = run_tuning(client, data, config, args.out, progress=not args.no_progress, extra=extra,
                                     metadata=metadata, tensorboard=args.tensorboard)  # fmt: skip
        _print_summary(summary, args.out)
        if summary.get("interrupted"):
            print(f"interrupted: evaluated and saved what was found; continue with bptvlm tune --resume {args.out}")
            return EXIT_INTERRUPTED
        return EXIT_OK

    return run_command(body, args.endpoint or common.DEFAULT_ENDPOINT)


def _prompts_path(value: str) -> Path:
    """--prompts: the file, or a run folder holding it; ``ValueError`` saying what it is instead."""
    from bptvlm.client.artifacts import PROMPTS_FILE

    path = Path(value)
    if path.is_dir():
        if not (path / PROMPTS_FILE).is_file():
            raise ValueError(f"--prompts {path} is a folder without {PROMPTS_FILE}: give a run folder of `bptvlm tune` "
                             "or its prompts.safetensors")
        return path / PROMPTS_FILE
    if not path.exists():
        raise ValueError(f"--prompts {path} does not exist")
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    """``bptvlm eval``: evaluate_saved, result as JSON on stdout."""

    def body() -> int:
        from bptvlm.client.artifacts import load_prompts
        from bptvlm.client.evaluate import evaluate_saved
        from bptvlm.data import check_source, load_test_split

        common.check_endpoint(args.endpoint or common.DEFAULT_ENDPOINT)
        prompts = _prompts_path(args.prompts)
        load_prompts(prompts)  # readable, before the server is asked
        spec, folder = _spec(args)
        check_source(spec, folder=folder, data_root=args.data_root)
        args.endpoint = args.endpoint or common.DEFAULT_ENDPOINT
        with common.make_client(args) as client:
            common.connect(client, args.wait)
            size = client.prompt_limits().image_size
            data = load_test_split(spec, image_size=size, test_fraction=args.test_fraction or 0.5, folder=folder,
                                   data_root=args.data_root)
            print(json.dumps(evaluate_saved(client, prompts, data, force=args.force), indent=2))
        return EXIT_OK

    return run_command(body, args.endpoint or common.DEFAULT_ENDPOINT)
