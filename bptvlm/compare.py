"""``bptvlm compare RUN...``: runs side by side, a table of what differs and what came out, and their
loss and validation-accuracy curves overlaid in one PNG (``client.tracking.plot_curves``, the plot each
run folder has as curves.png)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bptvlm.client.artifacts import PROGRESS_FILE, SUMMARY_FILE, write_atomic
from bptvlm.client.tracking import plot_curves, run_curve

COMPARE_PNG, COMPARE_MD = "compare.png", "compare.md"
_IGNORED = {"template"}  # None vs the task's own: shown by the template column when it differs


@dataclass
class Run:
    """A finished (or stopped) run folder: its summary and its progress records."""

    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def load_run(path: str | Path) -> Run:
    """``ValueError`` naming the folder when it holds no run of `bptvlm tune`."""
    folder = Path(path)
    if not (folder / SUMMARY_FILE).is_file():
        raise ValueError(f"{folder} is not a run folder of `bptvlm tune` (no {SUMMARY_FILE}; an unfinished run: "
                         f"finish it with bptvlm tune --resume {folder})")
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    progress = folder / PROGRESS_FILE
    records = [json.loads(line) for line in progress.read_text().splitlines()] if progress.is_file() else []
    return Run(folder, summary, records)


def config_differences(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs, in the config's order."""
    configs = [r.summary.get("config", {}) for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if k not in _IGNORED and len({json.dumps(c.get(k)) for c in configs}) > 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(runs: list[Run]) -> str:
    """A Markdown table: one row a run, the differing settings then zero-shot, tuned, queries, wall."""
    differ = config_differences(runs)
    head = ["run", *differ, "zero-shot", "tuned", "selected", "train queries", "eval queries", "wall s"]
    rows = []
    for r in runs:
        s, c = r.summary, r.summary.get("config", {})
        rows.append([r.path.name, *(_fmt(c.get(k)) for k in differ), _fmt(s.get("zero_shot_accuracy")),
                     _fmt(s.get("test_accuracy")), _fmt(s.get("selected")), _fmt(s.get("train_queries")),
                     _fmt(s.get("eval_queries")), _fmt(s.get("wall_s"))])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    same = sorted(set(runs[0].summary.get("config", {})) - set(differ) - _IGNORED)
    if same:
        lines += ["", "Same in every run: " + ", ".join(f"{k}={_fmt(runs[0].summary['config'][k])}" for k in same)]
    return "\n".join(lines)


def label(run: Run, differ: list[str]) -> str:
    """A run's legend entry: its folder and the settings that set it apart."""
    c = run.summary.get("config", {})
    parts = [f"{k}={_fmt(c.get(k))}" for k in differ[:3]]
    return run.path.name + (f" ({', '.join(parts)})" if parts else "")


def compare(paths: list[str | Path], out: str | Path | None = None) -> tuple[str, Path | None]:
    """The table (Markdown) and, with ``out``, OUT/compare.md and OUT/compare.png; returns both."""
    runs = [load_run(p) for p in paths]
    if len(runs) < 1:
        raise ValueError("compare needs at least one run folder")
    text = table(runs)
    if out is None:
        return text, None
    folder = Path(out)
    differ = config_differences(runs)
    curves = [run_curve(r.records, r.summary, label(r, differ)) for r in runs]
    png = plot_curves(curves, folder / COMPARE_PNG, title=f"{len(runs)} runs")
    commands = [f"- {r.path.name}: `{r.summary.get('command') or '(Python API)'}`" for r in runs]
    write_atomic(folder / COMPARE_MD, "\n".join([text, "", "Runs:", *commands, "", f"![curves]({COMPARE_PNG})", ""]))
    return text, png
