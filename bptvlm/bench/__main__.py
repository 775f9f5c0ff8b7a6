"""``python -m bptvlm.bench ...`` = ``bptvlm bench ...`` (before/without the top-level wiring)."""

from __future__ import annotations

import argparse
import logging
import sys

from .cli import add_commands


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="bptvlm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
