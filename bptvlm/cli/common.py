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


REFUSED_FOR_S = 5.0  # a refused connection is retried this long (a server binding its port), then reported


class _DeprecatedModel(argparse.Action):
    """``--model`` where ``--served-model`` is meant (tune, eval, bench): still works, says so once."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        logger.warning("--model here is deprecated: it names the served model, which is --served-model (in `serve`, "
                       "`demo` and `perf`, --model is a model spec)")
        setattr(namespace, self.dest, values)


def add_connection(parser: argparse.ArgumentParser, dest: str = "served_model") -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--endpoint", default=None, help=f"base URL of the bptvlm server, with http:// (default: {DEFAULT_ENDPOINT}); "
                       "URL1,URL2,...: several servers of the same model, each generation split across them by their "
                       "measured throughput (the result is the same as on one)")
    group.add_argument("--api-key", default=None,
                       help=f"bearer token for the server (default: the environment variable {API_KEY_ENV}; none for an "
                       "open local server)")
    group.add_argument("--served-model", dest=dest, default=None, metavar="NAME",
                       help="name of the served model, as in /v2/models/{name} (default: clip)")
    group.add_argument("--model", dest=dest, action=_DeprecatedModel, help=argparse.SUPPRESS)
    group.add_argument("--wait", type=float, default=60.0,
                       help="seconds to wait for a server that answers but is still loading its model; a refused "
                       f"connection or a server that is not bptvlm fails after {REFUSED_FOR_S:.0f} s (default: %(default)s)")
    group.add_argument("--retry-for", type=float, default=120.0, metavar="SECONDS",
                       help="keep retrying a request that failed to connect or got 503 (or 429 with Retry-After) for up "
                       "to this long, with backoff and the same request id, so a server restart within it is survived "
                       "(default: %(default)s)")


def make_client(args: argparse.Namespace) -> Any:
    """The API client the commands use (tests replace this to bind it in-process)."""
    from bptvlm.client.api import ClipClient
    from bptvlm.shared.protocol import DEFAULT_MODEL_NAME

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None

    def one(url: str, retry_for: float) -> ClipClient:
        return ClipClient(url, api_key=api_key, model=args.served_model or DEFAULT_MODEL_NAME, max_retries=None,
                          retry_for=retry_for, max_backoff=MAX_BACKOFF_S)

    endpoint = args.endpoint or DEFAULT_ENDPOINT
    if "," not in endpoint:
        return one(endpoint, args.retry_for)
    from bptvlm.client.fanout import FANOUT_RETRY_S, FanoutClient, split_endpoints  # URL1,URL2: one run over all

    return FanoutClient([one(url, min(args.retry_for, FANOUT_RETRY_S)) for url in split_endpoints(endpoint)])


def connect(client: Any, wait: float) -> None:
    """Fail fast when nothing bptvlm answers at the endpoint, then wait up to ``wait`` s for it to be ready."""
    client.check_server(refused_for=min(wait, REFUSED_FOR_S))
    client.wait_until_ready(wait)


def check_endpoint(endpoint: str) -> None:
    """A local check, before anything waits: the endpoint (each of ``URL1,URL2,...``) is a URL with a scheme."""
    if "," in endpoint:
        from bptvlm.client.fanout import split_endpoints

        for url in split_endpoints(endpoint):
            check_endpoint(url)
        return
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint {endpoint!r} has no scheme: give the full URL, e.g. http://{endpoint.lstrip('/')}")


def check_out(out: str | os.PathLike[str], *, overwrite: bool, what: str = "run") -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (then the caller clears what it writes)."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--out {path} is not empty (it holds {', '.join(sorted(p.name for p in path.iterdir())[:4])}): "
                         f"continue that {what} with --resume {path}, replace it with --overwrite, or choose another folder")


def command_line(args: argparse.Namespace | None = None) -> str:
    """The command as typed (for summary.json): the arguments ``main`` parsed, else the process's."""
    import shlex
    import sys

    argv = getattr(args, "argv", None)
    return shlex.join(["bptvlm", *(sys.argv[1:] if argv is None else argv)])


def run_command(body: Callable[[], int], endpoint: str = DEFAULT_ENDPOINT) -> int:
    """Run a command body with the shared error handling: a clear one-line message and an exit code
    instead of a traceback for every user or server error."""
    import httpx

    from bptvlm.client.data import DataError
    from bptvlm.shared.errors import BptvlmError, BudgetExhaustedError

    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
    from bptvlm.client.api import UnreachableError
    from bptvlm.shared.errors import AuthError

    try:
        return int(body())
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED
    except BudgetExhaustedError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None:
            logger.error("the key's query quota ran out after %d training queries: %s. The best prompt so far (train loss "
                         "%.4f, not validated) and a summary are saved; resume with a new quota to finish",
                         summary["train_queries"], exc, summary["best_train_loss"])  # fmt: skip
        else:
            logger.error("query quota: %s", exc)
        return EXIT_BUDGET
    except AuthError as exc:
        logger.error("%s: the server wants an API key; give --api-key KEY or set %s", exc, API_KEY_ENV)
        return EXIT_USAGE
    except UnreachableError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except BptvlmError as exc:
        logger.error("request failed (%d): %s", exc.status_code, exc)
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        logger.error("cannot reach %s: %s", endpoint, exc)
        return EXIT_FAILED
    except (DataError, ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        logger.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return EXIT_USAGE
