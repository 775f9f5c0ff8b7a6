"""What every command shares: exit codes, the error-to-exit-code mapping, the API client factory and
the flags generated from ``TuneConfig``'s fields (one default, written once in client/config.py).

Imports no torch or nevergrad: parsers are built before any command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
API_KEY_ENV = "BPTVLM_API_KEY"
DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
MAX_BACKOFF_S = 10.0  # longest pause between retries: a restarted server is noticed within this


def config_flags() -> dict[str, str]:
    """TuneConfig field -> its flag (``d_text`` -> ``--intrinsic-dim-text``, else ``--field-name``)."""
    from bptvlm.client.config import TuneConfig

    return {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in fields(TuneConfig)}


def add_config_flags(parser: argparse.ArgumentParser | Any, skip: tuple[str, ...] = ()) -> None:
    """One flag per ``TuneConfig`` field and ``--preset``; every default is None ("not given"), so the
    preset fills it in; the help shows the default preset's value and the paper's where they differ."""
    from bptvlm.client.config import DEFAULT_PRESET, PRESETS, resolve_config

    default, paper = resolve_config(DEFAULT_PRESET), resolve_config("paper")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help=f"where every setting not given comes from: 'paper' is BPT-VLM as published, "
                        f"'{DEFAULT_PRESET}' the best measured on the embedded suite (default: {DEFAULT_PRESET})")
    flags = config_flags()
    for f in fields(default):
        if f.name in skip:
            continue
        kind = str(f.type)
        typ: Callable[[str], Any] = int if "int" in kind else float if "float" in kind else str
        mine, theirs = getattr(default, f.name), getattr(paper, f.name)
        shown = f"default: {mine}" + (f"; paper: {theirs}" if theirs != mine else "")
        help_text = f.metadata["help"].replace("%", "%%")
        parser.add_argument(flags[f.name], dest=f.name, type=typ, default=None, choices=f.metadata.get("choices"),
                            metavar=None if f.metadata.get("choices") else f.name.upper(),
                            help=f"{help_text} ({shown})" if mine is not None or theirs is not None else help_text)


def given_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TuneConfig`` settings given on the command line (not None)."""
    return {name: getattr(args, name) for name in config_flags() if getattr(args, name, None) is not None}


def add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--endpoint", default=None, help=f"base URL of the bptvlm server (default: {DEFAULT_ENDPOINT})")
    group.add_argument("--api-key", default=None,
                       help=f"bearer token for the server (default: the environment variable {API_KEY_ENV}; none for an "
                       "open local server)")
    group.add_argument("--model", default=None, help="model name in /v2/models/{name} (default: clip)")
    group.add_argument("--wait", type=float, default=60.0,
                       help="seconds to wait for the server to become ready (default: %(default)s)")
    group.add_argument("--retry-for", type=float, default=120.0, metavar="SECONDS",
                       help="keep retrying a request that failed to connect or got 503 (or 429 with Retry-After) for up "
                       "to this long, with backoff and the same request id, so a server restart within it is survived "
                       "(default: %(default)s)")


def make_client(args: argparse.Namespace) -> Any:
    """The API client the commands use (tests replace this to bind it in-process)."""
    from bptvlm.client.api import ClipClient
    from bptvlm.shared.protocol import DEFAULT_MODEL_NAME

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return ClipClient(args.endpoint or DEFAULT_ENDPOINT, api_key=api_key, model=args.model or DEFAULT_MODEL_NAME,
                      max_retries=None, retry_for=args.retry_for, max_backoff=MAX_BACKOFF_S)  # fmt: skip


def run_command(body: Callable[[], int], endpoint: str = DEFAULT_ENDPOINT) -> int:
    """Run a command body with the shared error handling: a clear one-line message and an exit code
    instead of a traceback for every user or server error."""
    import httpx

    from bptvlm.client.data import DataError
    from bptvlm.shared.errors import BptvlmError, BudgetExhaustedError

    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
    try:
        return int(body())
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED
    except BudgetExhaustedError as exc:
        logger.error("query budget exhausted: %s", exc)
        return EXIT_BUDGET
    except BptvlmError as exc:
        logger.error("request failed (%d): %s", exc.status_code, exc)
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        logger.error("cannot reach %s: %s", endpoint, exc)
        return EXIT_FAILED
    except (DataError, ValueError, KeyError, FileNotFoundError) as exc:
        logger.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return EXIT_USAGE
