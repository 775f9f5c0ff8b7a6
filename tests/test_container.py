"""Static checks of the container files: they catch mistakes without a Docker engine.

The real thing (build, compose up, health check, a client container) is scripts/container_smoke.sh,
which CI runs after this suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from bptvlm.cli import build_parser
from bptvlm.server.config import Settings
from bptvlm.world.tasks import list_tasks

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SMOKE = ROOT / "scripts" / "container_smoke.sh"


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _docker_cmd(instruction: str) -> list[str]:
    line = next(l for l in DOCKERFILE.splitlines() if l.startswith(instruction + " "))
    return yaml.safe_load(line[len(instruction) + 1 :])


def _expand(value: str, **env: str) -> str:
    """Compose's ${VAR:-default} interpolation, with ``env`` set and everything else unset."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), value)


def _parse(command: list[str], **env: str):
    return build_parser().parse_args([_expand(a, **env) for a in command])


def _stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


def test_package_dirs_exist_and_are_copied_into_the_image() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), package
        assert re.search(rf"^COPY {folder} \./{folder}$", DOCKERFILE, re.M), f"Dockerfile does not copy {folder}/"


def test_dockerfile_runs_a_valid_serve_command() -> None:
    assert _docker_cmd("ENTRYPOINT") == ["bptvlm"]
    args = build_parser().parse_args(_docker_cmd("CMD"))
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000 and args.model == "embedded"
    assert f"127.0.0.1:{args.port}/v2/health/ready" in DOCKERFILE and f"EXPOSE {args.port}" in DOCKERFILE
    assert 'pip install "torch==${TORCH_VERSION}"' in DOCKERFILE  # torch first, from the chosen index


def test_dockerfile_build_args_default_to_what_a_real_host_uses() -> None:
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in DOCKERFILE
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu\n" in DOCKERFILE
    assert "ARG INSTALL_EXTRA_CA=0\n" in DOCKERFILE
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"torch==([0-9.]+)", ci).group(1)
    assert f"ARG TORCH_VERSION={pinned}\n" in DOCKERFILE and f"TORCH_VERSION={pinned}\n" in SMOKE.read_text()


def test_final_stage_runs_as_a_non_root_user_with_the_model_and_cache_volume_paths() -> None:
    assert [s.splitlines()[0] for s in _stages()] == ["${BASE_IMAGE} AS deps", "deps AS wheel", "${BASE_IMAGE}"]
    final = _stages()[-1]
    assert re.search(r"^USER (?!root)\w+$", final, re.M) and "useradd" in final
    assert "HF_HOME=/cache/huggingface" in final and "/ledger" in final and "/runs" in final
    # The optional CA bundle reaches the final image only through /opt/trust, filled when INSTALL_EXTRA_CA=1.
    assert "docker-extr" not in final and "ca.crt" not in final


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    deps = next(s for s in _stages() if s.split()[2:3] == ["deps"])
    assert "pip install -r requirements.txt" in deps and "COPY server" not in deps


def test_dockerignore_is_an_allowlist_that_admits_every_copied_path() -> None:
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*", "everything else (.venv, runs, tests) must stay out of the build context"
    allowed = {l[1:] for l in lines if l.startswith("!")}
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert re.sub(r"\[(\w)\]$", r"\1", source) in allowed, f".dockerignore leaves out {source}"


def test_compose_server_and_client() -> None:
    compose = _compose("docker-compose.yml")
    server = compose["services"]["server"]
    assert server["build"] == "." and server["image"] == "bptvlm:latest"
    args = _parse(server["command"])
    assert (args.command, args.host, args.port, args.model) == ("serve", "0.0.0.0", 8000, "embedded")
    health = _expand(" ".join(server["healthcheck"]["test"]), BPTVLM_PORT="9123")
    assert "127.0.0.1:9123/v2/health/ready" in health and _parse(server["command"], BPTVLM_PORT="9123").port == 9123
    cache = server["environment"]["HF_HOME"]
    assert any(v.split(":")[1] == cache and v.split(":")[0] in compose["volumes"] for v in server["volumes"])
    assert "ports" not in server, "published ports live in docker-compose.override.yml (v1 refuses them with host networking)"
    client = compose["services"]["client"]
    assert client["depends_on"]["server"]["condition"] == "service_healthy" and client["image"] == server["image"]
    args = _parse(client["command"], BPTVLM_PORT="9123")
    assert args.command == "tune" and args.endpoint == "http://server:9123"
    assert args.task in {t.name for t in list_tasks()} and args.out.startswith("/runs/")


def test_the_override_publishes_the_servers_port() -> None:
    server = _compose("docker-compose.override.yml")["services"]["server"]
    assert [_expand(p, BPTVLM_PORT="9123") for p in server["ports"]] == ["9123:9123"]


def test_host_network_override_binds_loopback_and_keeps_the_serve_flags() -> None:
    base = _compose("docker-compose.yml")["services"]
    override = _compose("docker-compose.hostnet.yml")["services"]
    assert {s["network_mode"] for s in override.values()} == {"host"} and set(override) == set(base)
    loopback, normal = _parse(override["server"]["command"]), _parse(base["server"]["command"])
    assert loopback.host == "127.0.0.1" and {**vars(loopback), "host": normal.host} == vars(normal)
    assert override["client"]["extra_hosts"] == ["server:127.0.0.1"]  # the client's endpoint names "server"


def test_ledger_override_is_a_volume_and_a_setting_the_server_reads() -> None:
    compose = _compose("docker-compose.ledger.yml")
    server = compose["services"]["server"]
    path = server["environment"]["BPTVLM_LEDGER"]
    assert any(path.startswith(v.split(":")[1] + "/") and v.split(":")[0] in compose["volumes"] for v in server["volumes"])
    assert Settings.model_config["env_prefix"] + "LEDGER" == "BPTVLM_LEDGER" and "ledger" in Settings.model_fields
    assert f"keys create --ledger {path}" in SMOKE.read_text()


def test_gpu_override_reserves_a_gpu() -> None:
    server = _compose("docker-compose.gpu.yml")["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["environment"]["BPTVLM_DEVICE"] == "cuda"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Compose v1 (docker-compose) not installed")
@pytest.mark.parametrize("files", [
    ["docker-compose.yml", "docker-compose.override.yml"],
    ["docker-compose.yml", "docker-compose.hostnet.yml", "docker-compose.ledger.yml"],
    ["docker-compose.yml", "docker-compose.override.yml", "docker-compose.gpu.yml", "docker-compose.ledger.yml"],
])
def test_compose_v1_accepts_the_files(files: list[str]) -> None:
    argv = ["docker-compose", "-p", "bptvlm-static"] + [a for f in files for a in ("-f", f)] + ["config", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BPTVLM_", "COMPOSE_"))}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


def test_smoke_script_is_valid_bash_and_runs_after_the_suite_in_ci() -> None:
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)
    text = SMOKE.read_text()
    assert "--bridge=none --iptables=false" in text and "docker-compose.hostnet.yml" in text
    for name in re.findall(r"-f (docker-compose[\w.]*\.yml)", text):
        assert (ROOT / name).is_file(), name
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    smoke = next(i for i, l in enumerate(ci) if l.strip().startswith("bash scripts/container_smoke.sh"))
    pytest_line = next(i for i, l in enumerate(ci) if l.startswith("python -m pytest"))
    assert pytest_line < smoke


def test_readme_names_only_compose_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Containers"):].split("\n## ")[0]
    names = set(re.findall(r"(docker-compose[\w.]*\.yml)", section))
    assert "docker-compose.hostnet.yml" in names and "scripts/container_smoke.sh" in section
    assert all((ROOT / n).is_file() for n in names), names
