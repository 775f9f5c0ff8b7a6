"""Checkpoint and resume: a run killed anywhere and resumed ends where an uninterrupted run ends.

A "kill" is ``_Killed`` (a ``BaseException``, so no handler of the tuner's catches it, like SIGKILL)
raised after the server answered a request and before the tuner sees the answer: the worst moment,
the generation was charged and its result is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.client import checkpoint as ck
from bptvlm.cli import common, tune as cli
from bptvlm.client import run as tuner
from bptvlm.client.api import REQUEST_ID_HEADER, ClipClient, InferResult
from bptvlm.client.artifacts import load_prompts
from bptvlm.client.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from bptvlm.client.data import FewShotData
from bptvlm.client.config import TuneConfig
from bptvlm.client.run import resume_tuning, run_tuning
from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.shared import errors as e

from .conftest import FakeServer, read_jsonl

SMALL = {"d_text": 8, "d_vision": 6, "n_ctx_text": 2, "n_ctx_vision": 2}
APP = {**SMALL, "n_ctx_text": 6}  # the real app needs room for "a photo of a"


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the tuner handles it."""


class DyingClient(ClipClient):
    """Dies right after the server answered its ``die_at``-th inference request (1-based)."""

    def __init__(self, *args: Any, die_at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_at, self.calls = die_at, 0

    def infer(self, inputs: Mapping[str, np.ndarray], **kwargs: Any) -> InferResult:
        result = super().infer(inputs, **kwargs)
        self.calls += 1
        if self.calls == self.die_at:
            raise _Killed(f"killed after request {self.calls}")
        return result


def _data(n_train: int = 6, n_test: int = 4, seed: int = 0, size: int = 8) -> FewShotData:
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 2

    return FewShotData(["cat", "dog"], *split(n_train), *split(n_test))


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same result: summary (but wall time, and image forwards, which the
    server's feature caches decide), progress (but wall time), prompts."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("wall_s"), s["server_usage"].pop("image_forwards"), s.pop("started_at"), s.pop("finished_at")
    assert sa == sb
    pa, pb = ([{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(d / "progress.jsonl")] for d in (a, b))
    assert pa == pb
    ta, tb = (load_prompts(d / "prompts.safetensors") for d in (a, b))
    assert ta.meta == tb.meta and set(ta.tensors) == set(tb.tensors)
    for name in ta.tensors:
        np.testing.assert_array_equal(ta.tensors[name], tb.tensors[name])


# --- against the real app (tiny-random CLIP) in-process ----------------------------------------


@pytest.fixture(scope="module")
def app_http() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model="tiny-random", device="cpu"))) as http:
        yield http


@pytest.mark.parametrize("optimizer", ["CMA", "DiagonalCMA", "TBPSA"])
@pytest.mark.parametrize("die_at", [1, 4, 7, 8], ids=["initial-loss", "mid-run", "last-generation", "evaluation"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(
    app_http: TestClient, tmp_path: Path, optimizer: str, die_at: int
) -> None:
    size = ClipClient("http://testserver", http=app_http).prompt_limits().image_size
    data = _data(size=size)
    config = TuneConfig(optimizer=optimizer, budget=27, popsize=5, **APP)  # 6 generations, the last of 2
    whole = run_tuning(ClipClient("http://testserver", http=app_http), data, config, tmp_path / "whole", progress=False)

    dying = DyingClient("http://testserver", http=app_http, die_at=die_at)  # 1 initial + 6 generations + evaluation
    with pytest.raises(_Killed):
        run_tuning(dying, data, config, tmp_path / "resumed", progress=False)
    resumed = resume_tuning(ClipClient("http://testserver", http=app_http), data, tmp_path / "resumed", progress=False)

    assert resumed["train_queries"] == whole["train_queries"] == 27
    assert resumed["eval_queries"] == whole["eval_queries"]
    assert resumed["server_usage"]["candidates"] == whole["server_usage"]["candidates"] == 27 + whole["eval_queries"]
    _same_run(tmp_path / "whole", tmp_path / "resumed")


# --- against the fake server --------------------------------------------------------------------


def test_kill_between_progress_line_and_checkpoint_leaves_no_duplicate(
    make_client: Callable[..., ClipClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TuneConfig(budget=30, popsize=5, **SMALL)
    run_tuning(make_client(), _data(), config, tmp_path / "whole", progress=False)
    saves = 0

    def save_then_die(path: Path, state: ck.Checkpoint) -> None:
        nonlocal saves
        saves += 1
        if saves == 5:  # start, initial loss, generations 0 and 1; dies saving generation 2
            raise _Killed
        save_checkpoint(path, state)

    monkeypatch.setattr(tuner, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_tuning(make_client(), _data(), config, tmp_path / "resumed", progress=False)
    assert [r["generation"] for r in read_jsonl(tmp_path / "resumed" / "progress.jsonl")] == [0, 1, 2]
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE).generation == 2
    monkeypatch.undo()
    resume_tuning(make_client(), _data(), tmp_path / "resumed", progress=False)
    assert [r["generation"] for r in read_jsonl(tmp_path / "resumed" / "progress.jsonl")] == list(range(6))
    _same_run(tmp_path / "whole", tmp_path / "resumed")


def test_resent_generation_reuses_its_request_id(
    make_client: Callable[..., ClipClient], fake_server: FakeServer, tmp_path: Path
) -> None:
    config = TuneConfig(budget=20, popsize=5, **SMALL)
    with pytest.raises(_Killed):
        run_tuning(_dying(make_client, 3), _data(), config, tmp_path, progress=False)  # dies after generation 1
    resume_tuning(make_client(), _data(), tmp_path, progress=False)
    ids = [r.headers[REQUEST_ID_HEADER] for r in fake_server.requests if r.url.path.endswith("/infer")]
    assert ids[2] == ids[3] and ids[2].endswith("-g1")  # generation 1, sent before and after the kill
    assert len(set(ids)) == len(ids) - 1
    assert all(i.startswith(ids[0].split("-")[0]) for i in ids)


def _dying(make_client: Callable[..., ClipClient], die_at: int) -> ClipClient:
    client = make_client()
    return DyingClient(client.endpoint, http=client._http, die_at=die_at)


def test_finished_run_is_reported_without_a_query(
    make_client: Callable[..., ClipClient], fake_server: FakeServer, tmp_path: Path
) -> None:
    summary = run_tuning(make_client(), _data(), TuneConfig(budget=10, popsize=5, **SMALL), tmp_path, progress=False)
    sent = len(fake_server.requests)
    assert resume_tuning(make_client(), _data(), tmp_path, progress=False) == summary
    assert len(fake_server.requests) == sent
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE).done


def test_ctrl_c_run_resumes_to_the_full_budget(
    make_client: Callable[..., ClipClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TuneConfig(budget=30, popsize=5, **SMALL)
    whole = run_tuning(make_client(), _data(), config, tmp_path / "whole", progress=False)
    client = make_client()
    real_infer = client.infer

    def interrupt_at_third(inputs: Mapping[str, np.ndarray], **kwargs: Any) -> InferResult:
        if str(kwargs.get("request_id", "")).endswith("-g2"):
            raise KeyboardInterrupt
        return real_infer(inputs, **kwargs)

    monkeypatch.setattr(client, "infer", interrupt_at_third)
    first = run_tuning(client, _data(), config, tmp_path / "resumed", progress=False)
    assert first["interrupted"] and first["train_queries"] == 10
    assert not load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE).done
    resumed = resume_tuning(make_client(), _data(), tmp_path / "resumed", progress=False)
    assert resumed["train_queries"] == 30 and not resumed["interrupted"]
    assert resumed["best_train_loss"] == whole["best_train_loss"] and resumed["test_accuracy"] == whole["test_accuracy"]
    # the interrupted run's evaluation was spent all the same, and is counted
    assert resumed["eval_queries"] == whole["eval_queries"] + first["eval_queries"] - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda server, data: data.train_images.__setitem__((0, 0, 0, 0), 7), "data differs"),
        (lambda server, data: data.class_names.reverse(), "data differs"),
        (lambda server, data: setattr(server, "metadata", _renamed(server.metadata, "other-clip")), "other-clip"),
    ],
    ids=["images", "class-names", "model"],
)
def test_resume_against_other_data_or_model_is_refused(
    make_client: Callable[..., ClipClient], fake_server: FakeServer, tmp_path: Path,
    change: Callable[[FakeServer, FewShotData], None], message: str,
) -> None:  # fmt: skip
    with pytest.raises(_Killed):
        run_tuning(_dying(make_client, 2), _data(), TuneConfig(budget=20, popsize=5, **SMALL), tmp_path, progress=False)
    data = _data()
    change(fake_server, data)
    sent = len(fake_server.requests)
    with pytest.raises(CheckpointError, match=message):
        resume_tuning(make_client(), data, tmp_path, progress=False)
    assert not any(r.url.path.endswith("/infer") for r in fake_server.requests[sent:])


def _renamed(metadata: Callable[[], dict[str, Any]], model_id: str) -> Callable[[], dict[str, Any]]:
    def renamed() -> dict[str, Any]:
        data = metadata()
        data["parameters"]["model_id"] = model_id
        return data

    return renamed


# --- the checkpoint file ------------------------------------------------------------------------


def _checkpoint(**changes: Any) -> ck.Checkpoint:
    return ck.Checkpoint(
        config={}, run_id="r", model_id="m", data_fingerprint="f", template="t", strategy=b"opt", **changes
    )


@pytest.mark.parametrize("failing", ["pickle.dump", "os.fsync", "os.replace"])
def test_a_failed_write_keeps_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, _checkpoint(generation=3))

    def torn(*args: Any, **kwargs: Any) -> None:
        if failing == "pickle.dump":
            args[1].write(b"\x80\x05partial")  # half a pickle reaches the temporary file
        raise OSError("disk full")

    module, name = failing.split(".")
    monkeypatch.setattr(getattr(ck, module), name, torn)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _checkpoint(generation=4))
    monkeypatch.undo()
    assert load_checkpoint(path).generation == 3
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]  # no temporary file left behind


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x80\x05partial")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps({"something": "else"}))
    with pytest.raises(CheckpointError, match="not written by bptvlm tune"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)


# --- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bptvlm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


TUNE = ["tune", "--endpoint", "http://fake", "--task", "shape", "--shots", "1", "--budget", "12", "--popsize", "4",
        "--variant", "text", "--intrinsic-dim-text", "6", "--n-ctx-text", "2", "--no-progress"]  # fmt: skip


def test_cli_resume_takes_the_runs_flags_and_refuses_contradicting_ones(
    make_client: Callable[..., ClipClient], fake_server: FakeServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake_server.limits = fake_server.limits.model_copy(update={"image_size": 16})
    monkeypatch.setattr(common, "make_client", lambda args: make_client())
    whole = tmp_path / "whole"
    args = _parser().parse_args([*TUNE, "--out", str(whole)])
    assert args.func(args) == common.EXIT_OK

    monkeypatch.setattr(common, "make_client", lambda args: _dying(make_client, 3))
    args = _parser().parse_args([*TUNE, "--out", str(tmp_path / "run")])
    with pytest.raises(_Killed):
        args.func(args)

    monkeypatch.setattr(common, "make_client", lambda args: make_client())
    for flag, value in [("--budget", "11"), ("--task", "colour"), ("--intrinsic-dim-text", "7"), ("--seed", "1")]:
        args = _parser().parse_args(["tune", "--resume", str(tmp_path / "run"), flag, value])
        assert args.func(args) == common.EXIT_USAGE
        assert f"{flag} {value} contradicts the run" in caplog.text
    # a run checkpointed before a setting existed had that setting's default: --text-context came later
    old = tmp_path / "old"
    old.mkdir()
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    del state.config["text_context"]
    save_checkpoint(old / CHECKPOINT_FILE, state)
    args = _parser().parse_args(["tune", "--resume", str(old), "--text-context", "per_class"])
    assert args.func(args) == common.EXIT_USAGE
    assert "--text-context per_class contradicts the run" in caplog.text and "(--text-context shared)" in caplog.text
    args = _parser().parse_args(["tune", "--resume", str(tmp_path / "run"), "--budget", "12", "--no-progress"])
    assert args.func(args) == common.EXIT_OK  # agreeing flags are fine
    _same_run(whole, tmp_path / "run")

    sent = len(fake_server.requests)
    capsys.readouterr()
    args = _parser().parse_args(["tune", "--resume", str(tmp_path / "run")])
    assert args.func(args) == common.EXIT_OK and len(fake_server.requests) == sent  # finished: only reported
    assert "train_queries" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "--task", "shape"], "tune needs --out"),
        (["tune", "--out", "x"], "tune needs --data, --task or --dataset"),
        (["tune", "--resume", "NOWHERE"], "nothing to resume"),
        (["tune", "--resume", "a", "--out", "b"], "name different runs"),
    ],
    ids=["no-out", "no-data", "no-checkpoint", "out-and-resume"],
)
def test_cli_tune_usage_errors(argv: list[str], message: str, caplog: pytest.LogCaptureFixture) -> None:
    args = _parser().parse_args(argv)
    assert args.func(args) == common.EXIT_USAGE
    assert message in caplog.text


# --- retrying through a server restart ----------------------------------------------------------


def test_retry_window_bounds_the_waiting(sleeps: list[float]) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = ClipClient("http://fake", transport=httpx.MockTransport(down), sleep=sleeps.append,
                        max_retries=None, retry_for=20.0, max_backoff=4.0)  # fmt: skip
    with pytest.raises(httpx.ConnectError):
        client.model_metadata()
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0] and sum(sleeps) <= 20.0


def test_server_restart_within_the_window_goes_unnoticed(
    fake_server: FakeServer, sleeps: list[float], tmp_path: Path
) -> None:
    """The server dies mid-run (connections refused, then 503 while loading) and comes back without
    the uploaded images; the run finishes with its exact budget and a single id per generation."""
    outage = iter([*["refused"] * 6, "loading", "loading"])
    died = False

    def restarting(request: httpx.Request) -> httpx.Response:
        nonlocal died
        if request.url.path.endswith("/infer") and len(fake_server.infer_bodies) == 3 and not died:
            died = True
            fake_server.batches.clear()
        state = next(outage, None) if died else None
        if state == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        if state == "loading":
            return httpx.Response(503, json={"error": "model loading"})
        return fake_server(request)

    client = ClipClient("http://fake", transport=httpx.MockTransport(restarting), sleep=sleeps.append,
                        max_retries=None, retry_for=120.0, max_backoff=10.0)  # fmt: skip
    summary = run_tuning(client, _data(), TuneConfig(budget=20, popsize=5, **SMALL), tmp_path, progress=False)
    assert summary["train_queries"] == 20 and len(sleeps) == 8
    assert fake_server.candidates == summary["train_queries"] + summary["eval_queries"]


def test_budget_exhausted_is_still_not_retried_within_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model="tiny-random", device="cpu", api_keys=("k",), quota=7)
    with TestClient(create_app(settings)) as http:
        sleeps: list[float] = []
        client = ClipClient("http://testserver", http=http, api_key="k", sleep=sleeps.append, max_retries=None, retry_for=60)
        monkeypatch.setattr(client, "usage_report", lambda: None)  # not refused up front: it runs out mid-run
        data = _data(size=client.prompt_limits().image_size)
        with pytest.raises(e.BudgetExhaustedError):
            run_tuning(client, data, TuneConfig(budget=20, popsize=5, **APP), tmp_path, progress=False)
        assert sleeps == []
        assert load_checkpoint(tmp_path / CHECKPOINT_FILE).train_queries == 5  # resumable once the quota grows
