"""Fan-out end to end: one tuning run over two `bptvlm serve` processes on 127.0.0.1.

Same seed, same result as one endpoint (best_train_loss and prompts, bit for bit); both endpoints charged,
their charges adding up to the run's queries; one endpoint killed mid-run and the run still finishes at
exactly its budget, on the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bptvlm.cli import main
from bptvlm.client.api import ClipClient
from bptvlm.client.artifacts import load_prompts
from bptvlm.client.config import resolve_config
from bptvlm.client.fanout import FanoutClient
from bptvlm.client.run import start
from bptvlm.data import load_data
from bptvlm.launch import free_port, wait_ready
from bptvlm.server.ledger import Ledger

from .client.conftest import write_image_folder

pytestmark = pytest.mark.slow
KEY = "fanout-key"
TUNE = ["--shots", "3", "--val-shots", "1", "--budget", "90", "--popsize", "15", "--intrinsic-dim-text", "30",
        "--intrinsic-dim-vision", "30", "--seed", "0", "--eval-every", "0", "--no-progress"]


class Server:
    def __init__(self, ledger: Path) -> None:
        key_store = Ledger(ledger)
        key_store.create_key("user", token=KEY)
        key_store.close()
        self.ledger = ledger
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bptvlm.cli", "serve", "--model", "tiny-random", "--port", self.url.rsplit(":", 1)[1],
             "--ledger", str(ledger), "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def charged(self) -> int:
        ledger = Ledger(self.ledger)
        try:
            return ledger.usage(ledger.key("user")).candidates
        finally:
            ledger.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    root = tmp_path_factory.mktemp("fanout")
    with ExitStack() as stack:
        started = [Server(root / f"ledger-{i}.db") for i in range(2)]  # start together: they load at once
        for s in started:
            stack.callback(s.stop)
        for s in started:
            wait_ready(s.url, s.proc, timeout=120)
        yield started


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "colours", {"red": 8, "green": 8, "blue": 8}, size=32,
                              tint=True)


def _config_and_data(data_dir: Path) -> tuple[Any, Any]:
    """What the command line with ``TUNE`` resolves to, through the Python API."""
    config = resolve_config(budget=90, popsize=15, d_text=30, d_vision=30, seed=0, shots=3, val_shots=1, eval_every=0)
    return config, load_data(str(data_dir), seed=0, shots=3, val_shots=1, image_size=32, folder=True)


@pytest.fixture(scope="module")
def alone_dir(servers: list[Server], data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the run on the first endpoint alone (its files in the folder returned)."""
    config, data = _config_and_data(data_dir)
    out = tmp_path_factory.mktemp("alone")
    with ClipClient(servers[0].url, api_key=KEY) as single:
        start(single, data, config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def alone(alone_dir: Path) -> dict[str, Any]:
    return json.loads((alone_dir / "summary.json").read_text())


def _tune(endpoint: str, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("BPTVLM_API_KEY", KEY)
    assert main(["tune", "--endpoint", endpoint, "--data", str(data), "--out", str(out), *TUNE]) == 0
    return json.loads((out / "summary.json").read_text())


def test_two_endpoints_give_one_endpoint_s_result_and_are_both_charged(servers: list[Server], data_dir: Path,
                                                                       tmp_path: Path, alone: dict[str, Any],
                                                                       alone_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = servers
    before = a.charged(), b.charged()
    fanned = _tune(f"{a.url},{b.url}", data_dir, tmp_path / "two", monkeypatch)  # the command line
    assert fanned["best_train_loss"] == alone["best_train_loss"]
    one, two = load_prompts(alone_dir / "prompts.safetensors"), load_prompts(tmp_path / "two" / "prompts.safetensors")
    assert one.tensors.keys() == two.tensors.keys()
    for name in one.tensors:
        np.testing.assert_array_equal(two.tensors[name], one.tensors[name])
    assert fanned["train_queries"] == 90 == alone["train_queries"]
    shares = {s["endpoint"]: s for s in fanned["endpoints"]}
    charged = a.charged() - before[0], b.charged() - before[1]
    assert charged[0] > 0 and charged[1] > 0
    assert sum(charged) == fanned["train_queries"] + fanned["eval_queries"]  # nothing charged twice or lost
    assert (shares[a.url]["usage"]["candidates"], shares[b.url]["usage"]["candidates"]) == charged


class _KillAt:
    """Wraps a client's ``infer``: at call ``at`` it SIGKILLs the server first (nothing in flight there)."""

    def __init__(self, client: ClipClient, server: Server, at: int) -> None:
        self.client, self.server, self.at, self.calls = client, server, at, 0
        self._infer = client.infer
        client.infer = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            os.kill(self.server.proc.pid, signal.SIGKILL)
            self.server.proc.wait(timeout=10)
        return self._infer(*args, **kwargs)


def test_one_endpoint_killed_mid_run_still_finishes_exactly(servers: list[Server], data_dir: Path,
                                                           alone: dict[str, Any]) -> None:
    a, c = servers  # the last test: it kills the second server
    config, data = _config_and_data(data_dir)
    before = a.charged(), c.charged()
    doomed = ClipClient(c.url, api_key=KEY, max_retries=None, retry_for=1.0, backoff=0.2)
    kill = _KillAt(doomed, c, at=4)
    with FanoutClient([ClipClient(a.url, api_key=KEY), doomed], cooldown_s=600) as fan:
        result = start(fan, data, config, None, progress=False)
    summary = result.summary
    assert kill.calls >= 4 and c.proc.poll() is not None
    assert summary["train_queries"] == 90 and summary["best_train_loss"] == alone["best_train_loss"]
    shares = {s["endpoint"]: s for s in summary["endpoints"]}
    assert shares[c.url]["failures"] == 1 and shares[c.url]["candidates"] > 0
    charged = a.charged() - before[0], c.charged() - before[1]  # the killed server's ledger is on disk
    assert sum(charged) == summary["train_queries"] + summary["eval_queries"]
    assert charged[1] == shares[c.url]["usage"]["candidates"]
