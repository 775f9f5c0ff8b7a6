"""Crashes end to end: ``bptvlm serve`` with a SQLite ledger and ``bptvlm tune`` as real processes.

- the client is SIGKILLed mid-run and ``bptvlm tune --resume`` finishes it;
- the server is SIGKILLed while it computes a generation and restarted on the same port with the same
  ledger; the client, still running, retries and finishes by itself.

Both runs must end exactly where an uninterrupted run with the same seed ends, with the budget spent
exactly and the ledger charging every query once (the generation in flight is re-sent under its first
request id, so the server answers a duplicate from its reply cache instead of charging it again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from bptvlm.cli import common, tune as cli
from bptvlm.launch import free_port, wait_ready
from bptvlm.server.ledger import Ledger

from .client.conftest import write_image_folder

pytestmark = pytest.mark.slow

BUDGET, POPSIZE = 96, 6  # 16 generations
TUNE = ["--shots", "4", "--budget", str(BUDGET), "--popsize", str(POPSIZE), "--intrinsic-dim-text", "12",
        "--intrinsic-dim-vision", "12", "--seed", "3", "--no-progress", "--retry-for", "60"]  # fmt: skip
KEYS = ("reference", "client-kill", "server-kill")


class Server:
    """``bptvlm serve`` on a fixed port, which can be SIGKILLed and started again."""

    def __init__(self, ledger: Path, log: Path) -> None:
        self.port, self.ledger, self.log = free_port(), ledger, log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "bptvlm.cli", "serve", "--model", "tiny-random", "--port", str(self.port),
               "--ledger", str(self.ledger), "--log-level", "WARNING"]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("resume")
    ledger = Ledger(root / "ledger.db")
    tokens = {name: ledger.create_key(name, quota=10_000) for name in KEYS}
    ledger.close()
    server = Server(root / "ledger.db", root / "server.log")
    server.start()
    try:
        wait_ready(server.url, server.proc, timeout=90)
        data = write_image_folder(root / "data", {"red": 8, "green": 8, "blue": 8}, size=32, tint=True)
        yield {"root": root, "server": server, "tokens": tokens, "data": data}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(world: dict[str, Any]) -> Path:
    """The uninterrupted run (in this process, through the same command)."""
    out = world["root"] / "reference"
    parser = _parser()
    args = parser.parse_args(["tune", "--endpoint", world["server"].url, "--api-key", world["tokens"]["reference"],
                              "--data", str(world["data"]), *TUNE, "--out", str(out)])  # fmt: skip
    assert args.func(args) == common.EXIT_OK
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bptvlm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _tune(world: dict[str, Any], key: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, common.API_KEY_ENV: world["tokens"][key]}
    log = (world["root"] / f"{key}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "bptvlm.cli", "tune", *args], env=env, stdout=log, stderr=log)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _charged(world: dict[str, Any], key: str) -> int:
    report = httpx.get(f"{world['server'].url}/v2/usage", headers={"Authorization": f"Bearer {world['tokens'][key]}"})
    report.raise_for_status()
    return int(report.json()["usage"]["candidates"])


def _same_result(reference: Path, run: Path) -> dict[str, Any]:
    """The run's summary, progress and prompts equal the reference's (but wall times, and image
    forwards, which the server's feature caches decide); returns the run's summary."""
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (reference, run))
    summary = dict(got)
    for s in (ref, got):
        s.pop("wall_s"), s["server_usage"].pop("image_forwards")
        for key in ("started_at", "finished_at", "command"):  # when and how it was started, not what it found
            s.pop(key)
    assert got == ref

    def progress(d: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in (d / "progress.jsonl").read_text().splitlines()]

    assert progress(run) == progress(reference)
    a, b = load_file(str(reference / "prompts.safetensors")), load_file(str(run / "prompts.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    return summary


def test_client_killed_mid_run_resumes_to_the_same_result(world: dict[str, Any], reference: Path) -> None:
    out = world["root"] / "client-kill"
    args = ["--endpoint", world["server"].url, "--data", str(world["data"]), *TUNE, "--out", str(out)]
    proc = _tune(world, "client-kill", *args)
    _wait_for(lambda: _lines(out / "progress.jsonl") >= 4 or proc.poll() is not None, 60, "4 generations")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    assert 4 <= _lines(out / "progress.jsonl") < BUDGET // POPSIZE

    resumed = _tune(world, "client-kill", "--resume", str(out), "--no-progress")
    assert resumed.wait(timeout=120) == 0
    summary = _same_result(reference, out)
    assert summary["train_queries"] == BUDGET
    assert _charged(world, "client-kill") == summary["train_queries"] + summary["eval_queries"]

    again = _tune(world, "client-kill", "--resume", str(out))  # finished: reported, nothing asked
    assert again.wait(timeout=60) == 0
    assert _charged(world, "client-kill") == summary["train_queries"] + summary["eval_queries"]


def test_server_killed_mid_generation_is_survived(world: dict[str, Any], reference: Path) -> None:
    out, server = world["root"] / "server-kill", world["server"]
    proc = _tune(world, "server-kill", "--endpoint", server.url, "--data", str(world["data"]), *TUNE, "--out", str(out))
    try:
        _wait_for(lambda: _lines(out / "progress.jsonl") >= 4 or proc.poll() is not None, 60, "4 generations")
        with sqlite3.connect(server.ledger) as db:  # kill while a generation is being computed (reserved, not charged)
            _wait_for(lambda: db.execute("SELECT count(*) FROM in_flight").fetchone()[0] > 0, 30, "a request in flight", 0.0005)
        server.kill()
        generations_at_kill = _lines(out / "progress.jsonl")
        assert proc.poll() is None and generations_at_kill < BUDGET // POPSIZE
        time.sleep(1.0)  # the client finds nobody there and backs off
        server.start()
        wait_ready(server.url, server.proc, timeout=90)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = _same_result(reference, out)
    assert summary["train_queries"] == BUDGET
    assert _charged(world, "server-kill") == summary["train_queries"] + summary["eval_queries"]
    assert "retry" in (world["root"] / "server-kill.log").read_text()
