"""`bptvlm demo` end to end on the tiny random model: a server subprocess, two tasks, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bptvlm.cli import main

pytestmark = pytest.mark.slow


def test_demo_writes_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--model", "tiny-random", "--tasks", "shape,count", "--budget", "40", "--popsize", "8",
                 "--seeds", "0,1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| shape |" in printed and "| count |" in printed and "| **average** |" in printed
    assert "model tiny-random(seed=0)" in printed and "wall time" in printed
    result = json.loads((tmp_path / "demo.json").read_text())
    assert [r["train_queries"] for r in result["runs"]] == [40] * 4
    assert result["tasks"]["shape"]["seeds"] == 2
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
