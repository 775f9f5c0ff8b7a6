"""``bptvlm bench`` end to end against a real server subprocess (tiny-random model), plus unit checks.

The e2e test runs a tiny grid twice: the CSV has one row per cell and checkpoint budget, no cell spent
more training queries than its budget, the server's ledger (GET /v2/usage) equals the queries the
cells report, and the second run skips every cell and charges nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bptvlm.launch import local_server

KEY = "bench-key"
TASKS = ("shape", "colours")  # a built-in task and an ImageFolder


def _usage(url: str) -> dict[str, int]:
    r = httpx.get(f"{url}/v2/usage", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    r.raise_for_status()
    return dict(r.json()["usage"])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with local_server("tiny-random", args=["--api-key", KEY, "--quota", "100000"], timeout=120) as url:
        yield url


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for name, rgb in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _bench(url: str, out: Path, data: Path, extra: list[str] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bptvlm.bench", "--endpoint", url, "--api-key", KEY, "--tasks", f"shape,{data}",
           "--optimizers", "CMA,OnePlusOne", "--budgets", "10,24", "--seeds", "0,1", "--variants", "joint,text",
           "--intrinsic-dims", "8", "--popsize", "7", "--shots", "2", "--val-shots", "2", "--test-per-class", "3",
           "--baselines", "zero-shot,ensemble", "--out", str(out), "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(server: str, tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "colours")
    out = tmp_path / "run"
    before = _usage(server)
    first = _bench(server, out, data)
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = _usage(server)

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    blackbox = [r for r in rows if r["kind"] == "blackbox"]
    # 2 tasks x 2 optimizers x 2 variants x 2 seeds x 2 budgets; baselines: 2 tasks x 2 seeds x 2
    assert len(blackbox) == 2 * 2 * 2 * 2 * 2 and len(rows) == len(blackbox) + 8
    for col in ("task", "optimizer", "variant", "seed", "budget", "queries", "val_accuracy", "test_accuracy", "wall_s",
                "requests", "image_forwards", "price", "eval_queries"):  # fmt: skip
        assert col in rows[0]
    for r in blackbox:  # checkpoints land on the budget exactly: never over
        assert int(r["queries"]) == int(r["budget"]) and int(r["budget"]) in (10, 24)
        assert int(r["requests"]) == {10: 2, 24: 5}[int(r["budget"])]  # 7, 3 | 4, 7, 3 (whole generations, split at the mark)
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0 and r["selected"] in ("best", "recommendation", "template")
        if r["variant"] == "joint":  # visual prompts: every candidate forwards every training image
            assert int(r["image_forwards"]) == int(r["queries"]) * 3 * 2 or r["task"] == "shape"
    # the server charged exactly what the cells report (training + evaluation queries)
    final = [r for r in rows if r["kind"] != "blackbox" or r["budget"] == "24"]
    charged = sum(int(r["queries"]) + int(r["eval_queries"]) for r in final)
    assert after_first["candidates"] - before["candidates"] == charged
    assert (out / "report.md").read_text().count("| shape |") >= 6
    assert len(list(out.glob("plot_*.png"))) == 4  # 2 tasks x 2 variants
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)

    # rerun: every cell is skipped, the server charges nothing, the outputs are the same
    csv_before = (out / "results.csv").read_text()
    second = _bench(server, out, data)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 cells run, 24 already finished" in second.stdout
    assert _usage(server) == after_first
    assert (out / "results.csv").read_text() == csv_before

    # a lost cell (as after Ctrl-C) is the only one run again
    victim = next((out / "cells").glob("shape__CMA__joint__s1__*.json"))
    victim.unlink()
    third = _bench(server, out, data)
    assert "1 cells run, 23 already finished" in third.stdout
    with (out / "results.csv").open() as f:
        redone = next(r for r in csv.DictReader(f) if (r["task"], r["optimizer"], r["variant"], r["seed"], r["budget"])
                      == ("shape", "CMA", "joint", "1", "24"))  # fmt: skip
    assert int(redone["queries"]) == 24 and 6 <= int(redone["eval_queries"]) <= 8  # 2 marks x (1-2 prompts + the template on val, 1 test)
    assert _usage(server)["candidates"] - after_first["candidates"] == 24 + int(redone["eval_queries"])


def test_grid_file_and_flags(tmp_path: Path) -> None:
    from bptvlm.cli.bench import _values, add_commands
    from bptvlm.bench.grid import make_grid

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text('tasks = ["shape", "count"]\noptimizers = ["CMA"]\nbudgets = [500, 250]\nseeds = [0, 1]\n'
                         'variants = ["joint", "text"]\nout = "x"\n')
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--grid", str(grid_file), "--seeds", "3"])
    grid = make_grid(_values(args))
    assert grid.budgets == (250, 500) and grid.seeds == (3,) and grid.tasks == ("shape", "count")
    assert len(grid.cells()) == 2 * 1 * 2 * 1
    assert [c.method for c in grid.baseline_cells(whitebox=False)] == ["zero-shot", "ensemble"] * 2
    assert {c.method for c in grid.baseline_cells(whitebox=True)} == {"zero-shot", "ensemble", "coop", "same-shape", "linear-probe"}
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_grid({"tasks": "shape", "optimizers": "CMAA"})
    with pytest.raises(ValueError, match="unknown key 'budget'"):
        bad = tmp_path / "bad.toml"
        bad.write_text("budget = 3\n")
        from bptvlm.bench.grid import load_grid_file

        load_grid_file(bad)


def test_text_context_reaches_the_cells_and_keys_only_when_set() -> None:
    from dataclasses import replace

    from bptvlm.bench.grid import make_grid

    grid = make_grid({"tasks": "shape", "preset": "paper", "optimizers": "DiagonalCMA", "variants": "text,vision"})
    mixed = replace(grid, text_context="mixed")
    text, vision = grid.cells()
    assert text.tune_config(grid).text_context == "shared" and text.tune_config(mixed).text_context == "mixed"
    assert "text_context" not in grid.shared()  # keys of cells cached before the setting existed stay the same
    assert text.key(grid, "m") != text.key(mixed, "m")
    assert vision.key(grid, "m") == vision.key(mixed, "m")  # no text context to tune: the same result
    for baseline in grid.baseline_cells(whitebox=True):
        if baseline.method == "same-shape":  # trains the grid's text-context form in-process
            assert (baseline.key(grid, "m") == baseline.key(mixed, "m")) == (baseline.variant == "vision")
            continue
        assert baseline.key(grid, "m") == baseline.key(mixed, "m")
        assert baseline.tune_config(mixed).text_context == "shared"  # d = 0 baselines cannot split a mixed context


def test_cli_parser_loads_no_torch() -> None:
    code = ("import argparse, sys\nfrom bptvlm.cli.bench import add_commands\np = argparse.ArgumentParser()\n"
            "add_commands(p.add_subparsers())\np.parse_args(['bench', '--tasks', 'shape'])\n"
            "heavy = [m for m in ('torch', 'nevergrad', 'transformers', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_coop_forward_equals_the_servers_prompted_text(tiny_model: object) -> None:
    import torch

    from bptvlm.bench.whitebox import CoOpText
    from bptvlm.client.config import Template

    clip = tiny_model
    template = Template("a photo of a {}.")
    texts = [template.class_text(n) for n in ("circle", "square", "star")]
    coop = CoOpText(clip, texts, 8, template.prefix)  # type: ignore[arg-type]
    delta = torch.randn(8, clip.limits.text_width, generator=torch.Generator().manual_seed(0)) * 0.1  # type: ignore[attr-defined]
    with torch.no_grad():
        mine = coop.features(delta)
    init = clip.context_init(template.prefix, 8)  # type: ignore[attr-defined]
    served = clip.encode_text(clip.tokenize(texts), (init + delta).unsqueeze(0))[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(mine, served, atol=1e-6, rtol=1e-5)
    coop.features().sum().backward()  # gradients reach the context
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0


def test_atomic_cell_store(tmp_path: Path) -> None:
    from bptvlm.bench.store import CellStore

    store = CellStore(tmp_path)
    assert not store.done("a")
    store.save("a", {"rows": [1]})
    assert store.done("a") and store.load("a") == {"rows": [1]}
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["a.json"]  # no temporary left
    json.loads((tmp_path / "cells" / "a.json").read_text())


def test_deep_axes_reach_the_cells_and_leave_shallow_keys_as_they_were() -> None:
    from bptvlm.bench.grid import make_grid

    grid = make_grid({"tasks": "shape", "optimizers": "DiagonalCMA", "variants": "joint,text", "seeds": "0",
                      "depths": "1,all", "deep_schedules": "cycle,joint", "subspaces": "separate,shared"})
    labels = [c.variant_label for c in grid.cells()]
    assert labels == ["joint", "joint shared", "joint deep=all cycle", "joint deep=all cycle shared",
                      "joint deep=all joint", "joint deep=all joint shared", "text", "text deep=all cycle",
                      "text deep=all joint"]  # shallow once; shared only for joint
    configs = {c.variant_label: c.tune_config(grid) for c in grid.cells()}
    assert (configs["joint deep=all joint shared"].depth, configs["joint deep=all joint shared"].deep_schedule,
            configs["joint deep=all joint shared"].subspace) == ("all", "joint", "shared")
    shallow = make_grid({"tasks": "shape", "variants": "joint", "seeds": "0"}).cells()[0]
    # the key a shallow cell had before the deep axes existed (cached cells stay valid)
    assert shallow.key(make_grid({"tasks": "shape", "variants": "joint", "seeds": "0"}), "m") == \
        "shape__DiagonalCMA__joint__s0__d500__t0v0__8679cbaa8f"


@pytest.mark.slow
def test_deep_and_shared_cells_end_to_end(server: str, tmp_path: Path) -> None:
    before = _usage(server)
    cmd = [sys.executable, "-m", "bptvlm.bench", "--endpoint", server, "--api-key", KEY, "--tasks", "shape",
           "--optimizers", "DiagonalCMA", "--budgets", "10,24", "--seeds", "0", "--variants", "joint",
           "--depths", "1,all", "--deep-schedules", "cycle,joint", "--subspaces", "separate,shared",
           "--intrinsic-dims", "8", "--popsize", "7", "--shots", "2", "--val-shots", "2", "--test-per-class", "3",
           "--baselines", "none", "--out", str(tmp_path / "b"), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "b" / "results.csv").open()))
    assert {r["variant"] for r in rows} == {"joint", "joint shared", "joint deep=all cycle", "joint deep=all cycle shared",
                                            "joint deep=all joint", "joint deep=all joint shared"}
    assert all(int(r["queries"]) == int(r["budget"]) for r in rows)  # each schedule spends exactly its budget
    spent = _usage(server)["candidates"] - before["candidates"]
    assert spent == sum(int(r["queries"]) + int(r["eval_queries"]) for r in rows if r["budget"] == "24")
