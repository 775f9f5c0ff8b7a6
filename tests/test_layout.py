"""Static checks: import boundaries, the CLI surface, and the container files (no Docker engine here)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

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


def test_package_dirs_exist_and_are_copied_into_the_image() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package, folder in mapping.items():
        assert (ROOT / folder / "__init__.py").is_file(), package
        assert re.search(rf"^COPY {folder} \./{folder}$", dockerfile, re.M), f"Dockerfile does not copy {folder}/"


def _docker_cmd(dockerfile: str, instruction: str) -> list[str]:
    line = next(l for l in dockerfile.splitlines() if l.startswith(instruction + " "))
    return yaml.safe_load(line[len(instruction) + 1 :])


def test_dockerfile_runs_a_valid_serve_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert _docker_cmd(dockerfile, "ENTRYPOINT") == ["bptvlm"]
    args = build_parser().parse_args(_docker_cmd(dockerfile, "CMD"))
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
    assert "/v2/health/ready" in dockerfile and "EXPOSE 8000" in dockerfile
    assert 'pip install "torch==${TORCH_VERSION}"' in dockerfile  # torch first, from the chosen index


def _expand(value: str) -> str:
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server = compose["services"]["server"]
    assert server["build"] == "." and "8000:8000" in server["ports"]
    args = build_parser().parse_args([_expand(a) for a in server["command"]])
    assert (args.command, args.host, args.port, args.model) == ("serve", "0.0.0.0", 8000, "embedded")
    assert "/v2/health/ready" in " ".join(server["healthcheck"]["test"])
    cache = server["environment"]["HF_HOME"]
    assert any(v.split(":")[1] == cache and v.split(":")[0] in compose["volumes"] for v in server["volumes"])
    client = compose["services"]["client"]
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    args = build_parser().parse_args([_expand(a) for a in client["command"]])
    assert args.command == "tune" and args.endpoint == "http://server:8000"


def test_gpu_override_reserves_a_gpu() -> None:
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    server = override["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["environment"]["BPTVLM_DEVICE"] == "cuda"


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
