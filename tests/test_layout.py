"""Static checks: import boundaries and the CLI surface (the container files: tests/test_container.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bptvlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [("client", ("bptvlm.server", "server")), ("server", ("bptvlm.client", "client")),
     ("shared", ("bptvlm.server", "bptvlm.client", "server", "client"))],
    ids=["client", "server", "shared"],
)
def test_import_boundaries(folder: str, forbidden: tuple[str, ...]) -> None:
    bad = {m for m in _imports(folder) if any(m == f or m.startswith(f + ".") for f in forbidden)}
    assert not bad, f"{folder}/ imports {sorted(bad)}"


def test_client_never_touches_weights() -> None:
    text = "\n".join(p.read_text() for p in (ROOT / "client").rglob("*.py"))
    assert "from_pretrained" not in text and "CLIPModel" not in text


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(python -m pytest[^\n]*)$", readme, re.M)
    assert command, "README.md gives no `python -m pytest` line"
    assert command.group(1) in ci
    assert "torch==2.13.0" in ci


def test_help_explains_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():  # type: ignore[union-attr]
        text = sp.format_help()
        assert sp.description, f"`bptvlm {name}` has no description"
        assert len(text) > 200, name


def test_the_command_line_loads_no_server_or_model_code() -> None:
    import subprocess
    import sys

    code = ("import sys, bptvlm.cli; bptvlm.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'bptvlm.server.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_lives_in_one_place() -> None:
    """client/ and server/ keep no argparse: every command is in bptvlm/cli/."""
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for d in ("client", "server", "shared") for p in (root / d).rglob("*.py")
                 if "argparse" in p.read_text()]
    assert offenders == []
