"""The researcher's workflow (issue 12): fail fast and clearly, never lose or mix up a run, accuracy vs
queries, config files, extending and comparing runs. The CLI against the in-process fake server."""

from __future__ import annotations

import argparse
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bptvlm.cli import build_parser, common
from bptvlm.client.api import ClipClient

from .conftest import FakeServer, read_jsonl, write_image_folder

TUNE = ["tune", "--endpoint", "http://fake", "--task", "shape", "--shots", "2", "--val-shots", "2", "--budget", "12",
        "--popsize", "4", "--variant", "text", "--intrinsic-dim-text", "6", "--n-ctx-text", "2", "--no-progress"]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture()
def fake_cli(make_client: Callable[..., ClipClient], fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake_server.limits = fake_server.limits.model_copy(update={"image_size": 16})
    monkeypatch.setattr(common, "make_client", lambda args: make_client())
    return fake_server


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


# --- fail fast ----------------------------------------------------------------------------------


class _NotBptvlm(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html>some other service</html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def other_service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotBptvlm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("endpoint", "code", "message"),
    [
        ("http://127.0.0.1:9", common.EXIT_FAILED, "connection refused at http://127.0.0.1:9"),
        ("OTHER", common.EXIT_FAILED, "is not a bptvlm/V2 server"),
        ("127.0.0.1:8000", common.EXIT_USAGE, "has no scheme: give the full URL, e.g. http://127.0.0.1:8000"),
    ],
    ids=["nothing-listening", "another-http-service", "no-scheme"],
)
def test_an_unusable_endpoint_fails_within_seconds_saying_what_happened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other_service: str, endpoint: str, code: int, message: str
) -> None:
    endpoint = other_service if endpoint == "OTHER" else endpoint
    started = time.monotonic()
    assert _run(["tune", "--endpoint", endpoint, "--task", "shape", "--out", str(tmp_path / "run")]) == code  # --wait 60
    assert time.monotonic() - started < 15  # not the 60 s of --wait
    assert message in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "NOWHERE"], "does not exist"),
        (["--task", "shapes"], "did you mean shape"),
        (["--task", "shape", "--preset", "paper", "--shots", "0"], "need shots >= 1"),
        (["--task", "shape", "--config", "NOWHERE.toml"], "--config NOWHERE.toml does not exist"),
    ],
    ids=["data-folder", "task-name", "config", "config-file"],
)
def test_local_checks_come_before_waiting_for_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: list[str], message: str
) -> None:
    started = time.monotonic()
    assert _run(["tune", "--endpoint", "http://127.0.0.1:9", *argv, "--out", str(tmp_path / "r")]) == common.EXIT_USAGE
    assert time.monotonic() - started < 4 and message in caplog.text and "connection refused" not in caplog.text


def test_shots_zero_is_refused_alike_for_a_task_and_a_folder(
    fake_cli: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    for source in (["--task", "shape"], ["--data", str(data)]):
        caplog.clear()
        assert _run(["tune", "--endpoint", "http://fake", *source, "--shots", "0", "--out", str(tmp_path / "r")]) == 2
        assert "need shots >= 1" in caplog.text


def test_budget_below_popsize_is_warned(fake_cli: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert _run([*TUNE, "--budget", "3", "--eval-every", "0", "--out", str(tmp_path / "r")]) == 0
    assert "--budget 3 is below --popsize 4" in caplog.text


# --- never lose or mix up a run -----------------------------------------------------------------


def test_a_non_empty_out_is_refused_unless_resume_or_overwrite(
    fake_cli: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    assert _run([*TUNE, "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    sent = len(fake_cli.requests)
    assert _run([*TUNE, "--seed", "1", "--out", str(out)]) == common.EXIT_USAGE
    assert f"--out {out} is not empty" in caplog.text and "--resume" in caplog.text and "--overwrite" in caplog.text
    assert len(fake_cli.requests) == sent and json.loads((out / "summary.json").read_text()) == first
    assert _run([*TUNE, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 1


def test_tasks_export_over_an_export_is_refused_and_overwrite_replaces_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "export"
    assert _run(["tasks", "export", "shape", str(out), "--shots", "3"]) == 0
    assert _run(["tasks", "export", "shape", str(out), "--shots", "1"]) == common.EXIT_USAGE
    assert "is not empty" in caplog.text
    assert _run(["tasks", "export", "shape", str(out), "--shots", "1", "--overwrite"]) == 0
    per_class = {len(list(d.iterdir())) for d in (out / "train").iterdir()}
    assert per_class == {1}  # not the 3-shot images left over
    assert _run(["tasks", "export", "shapes", str(tmp_path / "x")]) == common.EXIT_USAGE  # no KeyError traceback
    assert "unknown task 'shapes'; did you mean shape" in caplog.text


def test_a_name_that_is_both_a_task_and_a_folder_is_an_error_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bptvlm.client.data import DataError
    from bptvlm.data import check_source

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "shape", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="'shape' is both the built-in task 'shape' and the folder .*write ./shape"):
        check_source("shape")
    check_source("./shape")  # the folder, unambiguous


def test_bench_into_another_grids_out_is_refused(tmp_path: Path) -> None:
    from bptvlm.bench.grid import make_grid
    from bptvlm.bench.harness import claim_out
    from bptvlm.client.artifacts import write_json

    out = tmp_path / "bench"
    grid = make_grid({"tasks": "shape", "budgets": "4,8"})
    write_json(out / "grid.json", {"grid": grid.to_dict()})
    (out / "plot_shape_text.png").write_bytes(b"old")
    claim_out(out, grid, overwrite=False)  # the same grid: resumes
    other = make_grid({"tasks": "shape", "budgets": "4,16"})
    with pytest.raises(ValueError, match="holds a benchmark of another grid .*differs in budgets"):
        claim_out(out, other, overwrite=False)
    claim_out(out, other, overwrite=True)
    assert not (out / "plot_shape_text.png").exists()  # no stale plots


# --- messages -----------------------------------------------------------------------------------


def test_eval_messages_name_what_was_given(fake_cli: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert _run([*TUNE, "--out", str(out)]) == 0
    ev = ["eval", "--endpoint", "http://fake", "--task", "shape"]
    assert _run([*ev, "--prompts", str(out / "summary.json")]) == common.EXIT_USAGE
    assert "is not a prompts file written by bptvlm tune" in caplog.text and "Traceback" not in caplog.text
    assert _run([*ev, "--prompts", str(out)]) == 0  # the run folder is fine
    fake_cli.metadata = lambda: {**FakeServer.metadata(fake_cli), "parameters": {**FakeServer.metadata(fake_cli)["parameters"], "model_id": "other"}}  # type: ignore[method-assign]
    assert _run([*ev, "--prompts", str(out)]) == common.EXIT_USAGE
    assert "was tuned on model 'fake-clip', the server serves 'other'" in caplog.text and "--force" in caplog.text
    assert _run([*ev, "--prompts", str(out), "--force"]) == 0


def test_a_missing_key_names_the_flag_and_the_variable(
    fake_cli: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx

    original = fake_cli.__call__

    def locked(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v2/models"):
            return httpx.Response(401, json={"error": "missing API key: send 'Authorization: Bearer <key>'"})
        return original(request)

    fake_cli.__class__ = type("Locked", (FakeServer,), {"__call__": lambda self, r: locked(r)})
    assert _run([*TUNE, "--out", str(tmp_path / "r")]) == common.EXIT_USAGE
    assert "give --api-key KEY or set BPTVLM_API_KEY" in caplog.text


def test_keys_usage_does_not_create_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["keys", "usage", "--ledger", str(tmp_path / "nonexist.db")]) == 2
    assert "no ledger at" in capsys.readouterr().err and not (tmp_path / "nonexist.db").exists()


def test_served_model_has_its_own_flag_and_model_still_works(caplog: pytest.LogCaptureFixture) -> None:
    args = _parser().parse_args(["tune", "--served-model", "clip2"])
    assert args.served_model == "clip2"
    args = _parser().parse_args(["eval", "--model", "clip3", "--task", "shape", "--prompts", "p"])
    assert args.served_model == "clip3" and "deprecated" in caplog.text
    assert _parser().parse_args(["bench", "--served-model", "c"]).model_name == "c"


def test_ctrl_c_saves_then_exits_130(fake_cli: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bptvlm.client import run as run_module

    real = run_module.run_search

    def interrupted(*args: object, **kwargs: object) -> object:
        kwargs["budget"] = 8  # two generations, then Ctrl-C
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_search", interrupted)
    out = tmp_path / "run"
    assert _run([*TUNE, "--out", str(out)]) == common.EXIT_INTERRUPTED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["train_queries"] == 8 and (out / "prompts.safetensors").is_file()


# --- accuracy vs queries, config files, extending -----------------------------------------------


def test_eval_every_records_val_accuracy_apart_and_draws_the_curves(fake_cli: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run([*TUNE, "--budget", "40", "--out", str(out)]) == 0  # default: every 4 queries = every generation
    records = read_jsonl(out / "progress.jsonl")
    assert len(records) == 10 and all("val_accuracy" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    # one evaluation query a point, only where the best changed; training queries stay exactly the budget
    curve_queries = records[-1]["eval_queries"] - 1  # the initial loss came first
    assert summary["train_queries"] == 40 and 1 <= curve_queries <= 10 and summary["eval_queries"] > records[-1]["eval_queries"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["command"].startswith("bptvlm") and summary["version"] and summary["started_at"] <= summary["finished_at"]


def test_config_file_keys_are_the_flags_and_flags_override(fake_cli: FakeServer, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('task = "shape"\nbudget = 8\npopsize = 4\nvariant = "text"\nintrinsic_dim_text = 6\n'
                      'n_ctx_text = 2\nshots = 2\nval_shots = 1\noptimizer = "CMA"\n')
    out = tmp_path / "run"
    assert _run(["tune", "--endpoint", "http://fake", "--config", str(config), "--popsize", "2", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["budget"], summary["popsize"], summary["d_text"], summary["optimizer"]) == (8, 2, 6, "CMA")
    config.write_text("budgte = 8\n")
    assert _run(["tune", "--config", str(config), "--out", str(tmp_path / "x")]) == common.EXIT_USAGE


def test_resume_with_a_larger_budget_extends_a_finished_run(fake_cli: FakeServer, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run([*TUNE, "--out", str(out)]) == 0
    assert _run(["tune", "--resume", str(out), "--budget", "20", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "progress.jsonl")
    assert summary["train_queries"] == 20 and summary["budget"] == 20 and [r["queries"] for r in records] == [4, 8, 12, 16, 20]
    assert _run(["tune", "--resume", str(out), "--budget", "16"]) == common.EXIT_USAGE


def test_tensorboard_events_are_written(fake_cli: FakeServer, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    assert _run([*TUNE, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for path in events:  # TFRecord: length u64, its crc u32, the record, its crc u32
        blob, at = path.read_bytes(), 0
        while at < len(blob):
            (n,) = struct.unpack("<Q", blob[at : at + 8])
            event = event_pb2.Event.FromString(blob[at + 12 : at + 12 + n])
            at += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == "tune/best_loss"]
    assert steps == [4, 8, 12]


def test_compare_prints_a_table_and_draws_overlaid_curves(
    fake_cli: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run([*TUNE, "--out", str(tmp_path / "a")]) == 0
    assert _run([*TUNE, "--seed", "1", "--popsize", "6", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert _run(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "seed" in table and "popsize" in table and "zero-shot" in table and "tuned" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "compare.md").is_file()
    assert _run(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == common.EXIT_USAGE


def test_default_preset_selects_on_validation(fake_cli: FakeServer, tmp_path: Path) -> None:
    argv = [a for a in TUNE]
    i = argv.index("--val-shots")
    del argv[i : i + 2]  # the default
    assert _run([*argv, "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["val_shots"] > 0 and summary["selected_by"] == "val_accuracy" and "val_accuracy_template" in summary
    assert np.isfinite(summary["zero_shot_accuracy"])
