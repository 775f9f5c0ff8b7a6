"""report.md and PNG plots from the result rows (means and standard deviations over seeds).

- Test accuracy, mean +- std over seeds, per task and budget; baselines in the same table (their
  accuracy does not depend on the budget: one value in the ``fixed`` column); a mean over tasks.
- Queries and wall time to reach 90% of the final accuracy: the first checkpoint budget at which the
  mean test accuracy is >= 0.9 x the mean test accuracy at the largest budget; with the cost units
  (requests, image forwards, price) of the full run beside it.
- Plots: per task and variant, test accuracy against training queries, one line per optimizer
  (mean, shaded +- std), baselines as horizontal lines.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Group = tuple[str, str, str, str, int, int, int]  # task, kind, method, variant, d, n_ctx_text, n_ctx_vision
KIND_NOTE = {"blackbox": "black-box", "api": "API baseline", "white-box": "white-box ceiling"}


def _group(row: dict[str, Any]) -> Group:
    return (row["task"], row["kind"], row["optimizer"], row["variant"], int(row["d"]), int(row["n_ctx_text"]), int(row["n_ctx_vision"]))


def label(g: Group, varied: set[str]) -> str:
    """A method's name in tables: optimizer and variant (+ d / prompt lengths when the grid varies them)."""
    _, kind, method, variant, d, nt, nv = g
    if kind == "blackbox":
        extra = [f"d={d}"] * ("d" in varied) + [f"ctx={nt}/{nv}"] * ("n_ctx" in varied)
        return " ".join([method, variant, *extra])
    if method == "coop":
        return f"CoOp (white-box) ctx={nt}" if "n_ctx" in varied else "CoOp (white-box)"
    if method == "same-shape":
        return " ".join([f"same shape {prompt_form(variant)} (white-box)", *[f"ctx={nt}/{nv}"] * ("n_ctx" in varied)])
    return {"linear-probe": "linear probe (white-box)"}.get(method, method)


def summarise(rows: list[dict[str, Any]]) -> dict[Group, dict[int, dict[str, Any]]]:
    """group -> budget -> {"n", "<field>_mean", "<field>_std"} over seeds."""
    acc: dict[Group, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[_group(r)][int(r["budget"])].append(r)
    fields = ("test_accuracy", "val_accuracy", "queries", "requests", "image_forwards", "price", "eval_queries", "wall_s")
    out: dict[Group, dict[int, dict[str, Any]]] = {}
    for g, per_budget in acc.items():
        out[g] = {}
        for b, rs in sorted(per_budget.items()):
            stats: dict[str, Any] = {"n": len(rs)}
            for f in fields:
                v = np.array([float(r.get(f) or 0.0) for r in rs])
                stats[f"{f}_mean"], stats[f"{f}_std"] = float(v.mean()), float(v.std())
            out[g][b] = stats
    return out


def _pm(s: dict[str, Any], f: str = "test_accuracy") -> str:
    return f"{100 * s[f + '_mean']:.1f} ± {100 * s[f + '_std']:.1f}"


def _varied(rows: list[dict[str, Any]]) -> set[str]:
    bb = [r for r in rows if r["kind"] == "blackbox"]
    varied = set()
    if len({r["d"] for r in bb}) > 1:
        varied.add("d")
    if len({(r["n_ctx_text"], r["n_ctx_vision"]) for r in bb}) > 1:
        varied.add("n_ctx")
    return varied


def _order(g: Group) -> tuple[int, str, str, int, int, int]:
    return ({"api": 0, "blackbox": 1, "white-box": 2}[g[1]], g[2], g[3], g[4], g[5], g[6])


def accuracy_table(summary: dict[Group, dict[int, dict[str, Any]]], budgets: list[int], varied: set[str]) -> str:
    """Markdown: task | method | kind | budget columns | fixed."""
    head = "| task | method | kind | " + " | ".join(f"{b} q" for b in budgets) + " | fixed |"
    lines = [head, "|" + "---|" * (4 + len(budgets))]
    for g in sorted(summary, key=lambda g: (g[0], _order(g))):
        per = summary[g]
        if g[1] == "blackbox":
            cells = [_pm(per[b]) if b in per else "" for b in budgets] + [""]
        else:
            cells = [""] * len(budgets) + [_pm(per[0])]
        lines.append(f"| {g[0]} | {label(g, varied)} | {KIND_NOTE[g[1]]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_over_tasks(summary: dict[Group, dict[int, dict[str, Any]]], budgets: list[int], varied: set[str]) -> str:
    """Markdown: method | budget columns | fixed, each the mean over tasks of the per-task mean."""
    by_method: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g, per_budget in summary.items():
        for b, s in per_budget.items():
            by_method[g[1:]][b].append(s["test_accuracy_mean"])
    n_tasks = len({g[0] for g in summary})
    lines = ["| method | kind | " + " | ".join(f"{b} q" for b in budgets) + " | fixed |", "|" + "---|" * (3 + len(budgets))]
    for m in sorted(by_method, key=lambda m: _order(("",) + m)):  # type: ignore[arg-type]
        accs = by_method[m]

        def mean(b: int) -> str:
            return f"{100 * np.mean(accs[b]):.1f}" if len(accs.get(b, [])) == n_tasks else ""

        cells = [mean(b) for b in budgets] + [""] if m[0] == "blackbox" else [""] * len(budgets) + [mean(0)]
        lines.append(f"| {label(('',) + m, varied)} | {KIND_NOTE[m[0]]} | " + " | ".join(cells) + " |")  # type: ignore[arg-type]
    return "\n".join(lines)


def prompt_form(variant: str) -> str:
    """A variant label without the search's schedule and subspace (``joint deep=all joint shared`` ->
    ``joint deep=all``): what a same-shape ceiling trains does not depend on them."""
    words = variant.split()
    keep = [w for i, w in enumerate(words) if not (i and words[i - 1].startswith("deep=")) and w != "shared"]
    return " ".join(keep)


def ceiling_of(g: Group) -> Group:
    """The same-shape white-box group of a black-box group (its prompt form trained by gradient)."""
    task, _, _, variant, _, nt, nv = g
    return (task, "white-box", "same-shape", prompt_form(variant), 0, nt, nv)


def ceiling_table(summary: dict[Group, dict[int, dict[str, Any]]], budgets: list[int], varied: set[str]) -> str:
    """Markdown: black-box method | budget columns, each the mean over tasks of black-box test accuracy /
    its same-shape white-box ceiling's (per task, seed means); '' where a task has no ceiling."""
    ratios: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    n_tasks = len({g[0] for g in summary})
    summary = {**summary, **{(*g[:3], prompt_form(g[3]), *g[4:]): v for g, v in summary.items() if g[2] == "same-shape"}}
    for g, per_budget in summary.items():
        ceiling = summary.get(ceiling_of(g)) if g[1] == "blackbox" else None
        if ceiling and ceiling[0]["test_accuracy_mean"] > 0:
            for b, s in per_budget.items():
                ratios[g[1:]][b].append(s["test_accuracy_mean"] / ceiling[0]["test_accuracy_mean"])
    lines = ["| method | " + " | ".join(f"{b} q" for b in budgets) + " |", "|" + "---|" * (1 + len(budgets))]
    for m in sorted(ratios, key=lambda m: _order(("",) + m)):  # type: ignore[arg-type]
        cells = [f"{np.mean(ratios[m][b]):.2f}" if len(ratios[m].get(b, [])) == n_tasks else "" for b in budgets]
        lines.append(f"| {label(('',) + m, varied)} | " + " | ".join(cells) + " |")  # type: ignore[arg-type]
    return "\n".join(lines) if ratios else ""


def cost_table(summary: dict[Group, dict[int, dict[str, Any]]], budgets: list[int], varied: set[str]) -> str:
    """Markdown: queries and wall time to 90% of the final accuracy, and the full run's cost units."""
    lines = [
        "| task | method | final acc | queries to 90% | wall s to 90% | requests | image forwards | price | eval queries | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted((g for g in summary if g[1] == "blackbox"), key=lambda g: (g[0], _order(g))):
        per = summary[g]
        final = per[max(per)]
        target = 0.9 * final["test_accuracy_mean"]
        reach = next((b for b in sorted(per) if per[b]["test_accuracy_mean"] >= target), max(per))
        lines.append(
            f"| {g[0]} | {label(g, varied)} | {_pm(final)} | {reach} | {per[reach]['wall_s_mean']:.1f} | "
            f"{final['requests_mean']:.0f} | {final['image_forwards_mean']:.0f} | {final['price_mean']:.4f} | "
            f"{final['eval_queries_mean']:.0f} | {final['wall_s_mean']:.1f} |"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], header: str, budgets: list[int]) -> Path:
    summary = summarise(rows)
    varied = _varied(rows)
    seeds = sorted({r["seed"] for r in rows})
    text = "\n\n".join([
        header.rstrip(),
        f"## Test accuracy (%), mean ± std over {len(seeds)} seed(s) {seeds}\n\n"
        "Black-box columns: training queries (candidates evaluated). Each checkpoint's prompt is chosen on the "
        "validation split (best candidate seen, the optimizer's recommendation or the untuned template, by validation "
        "accuracy, ties by loss); test is only scored. `fixed`: baselines, which spend no training queries.\n\n" + accuracy_table(summary, budgets, varied),
        "## Mean over tasks (%)\n\n" + mean_over_tasks(summary, budgets, varied),
        *(["## Black-box as a fraction of its same-shape white-box ceiling\n\nEach black-box column's test accuracy "
           "divided by that of the same prompt form (towers, text-context form, lengths, placement) trained in-process by "
           "gradient (`same-shape`), per task, then the mean over tasks.\n\n" + table]
          if (table := ceiling_table(summary, budgets, varied)) else []),
        "## Queries and wall time to 90% of the final accuracy\n\n"
        "First checkpoint budget whose mean test accuracy is >= 0.9 x the mean at the largest budget (so at most the "
        "resolution of the budgets). Cost units are the full run's means per seed: HTTP requests, image forwards "
        "(server-reported), price, evaluation queries (validation and test, not in the training count) and "
        "training wall seconds.\n\n" + cost_table(summary, budgets, varied),
    ])
    sections = [text]
    from .paper import beside_the_paper

    paper = beside_the_paper(rows)
    if paper:
        sections.append("## Beside the paper's reported numbers (test accuracy %)\n\nThe paper's (BPT-VLM, ViT-B/32, 16 "
                        "shots, CMA-ES) as published, which the reference code takes as the best test accuracy seen during "
                        "the run; ours: the prompt chosen on validation at the task's final budget, mean ± std over seeds, "
                        "on the model this server serves.\n\n" + paper)
    if any(r.get("new_accuracy") is not None for r in rows):
        sections.append("## Base-to-new (%)\n\nTuned on the first half of the classes by label (base), tested on the "
                        "base classes and on the other half (new, never seen); harmonic mean 2 b n / (b + n) per seed, "
                        "then mean ± std; black-box rows at the task's final budget.\n\n" + base_to_new_table(rows))
    text = "\n\n".join(sections)
    path = out / "report.md"
    from bptvlm.client.artifacts import write_atomic

    write_atomic(path, text + "\n")
    return path


def base_to_new_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: task | method | base | new | harmonic mean (mean ± std over seeds)."""
    final: dict[str, int] = {}
    for r in rows:
        if r["kind"] == "blackbox":
            final[r["task"]] = max(final.get(r["task"], 0), int(r["budget"]))
    acc: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("new_accuracy") is None or (r["kind"] == "blackbox" and int(r["budget"]) != final[r["task"]]):
            continue
        acc[(r["task"], r["optimizer"] if r["kind"] != "blackbox" else f"{r['optimizer']} {r['variant']}")].append(r)
    lines = ["| task | method | base | new | harmonic mean |", "|---|---|---|---|---|"]
    for (task, method), rs in sorted(acc.items()):
        cells = []
        for f in ("base_accuracy", "new_accuracy", "harmonic_mean"):
            v = np.array([float(r[f]) for r in rs])
            cells.append(f"{100 * v.mean():.1f} ± {100 * v.std():.1f}")
        lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """One PNG per task and variant; [] (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    summary = summarise(rows)
    varied = _varied(rows)
    paths = []
    tasks = sorted({g[0] for g in summary})
    for task in tasks:
        lines = [g for g in summary if g[0] == task and g[1] == "blackbox"]
        for variant in sorted({g[3] for g in lines}):
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            for g in sorted(g for g in lines if g[3] == variant):
                per = summary[g]
                b = sorted(per)
                x = np.array([per[k]["queries_mean"] for k in b])
                m = np.array([per[k]["test_accuracy_mean"] for k in b])
                s = np.array([per[k]["test_accuracy_std"] for k in b])
                (line,) = ax.plot(x, m, marker="o", label=label(g, varied))
                ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
            for g in sorted(g for g in summary if g[0] == task and g[1] != "blackbox"):
                ax.axhline(summary[g][0]["test_accuracy_mean"], linestyle="--", linewidth=1, color="grey" if g[1] == "api" else "black")
                ax.annotate(label(g, varied), (0, summary[g][0]["test_accuracy_mean"]), fontsize=7, va="bottom")
            ax.set_xlabel("training queries (candidates evaluated)")
            ax.set_ylabel("test accuracy")
            ax.set_xlim(left=0)  # from 0 queries, where zero-shot stands
            ax.set_ylim(0, 1.02)
            n_seeds = max(summary[g][b]["n"] for g in lines for b in summary[g])
            ax.set_title(f"{task}: {variant} prompts\nline: mean over {n_seeds} seed(s); band: ± 1 std; dashed: baselines",
                         fontsize=9)
            ax.grid(alpha=0.3)
            handles, labels_ = ax.get_legend_handles_labels()
            fig.legend(handles, labels_, loc="lower center", ncol=2, fontsize=8, frameon=False)
            fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) - 1) // 2), 1, 1))
            path = out / f"plot_{''.join(c if c.isalnum() or c in '-_' else '_' for c in task)}_{variant}.png"
            fig.savefig(path, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths
