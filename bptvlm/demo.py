"""``bptvlm demo``: serve the embedded CLIP in a subprocess, tune every built-in task through the API,
print zero-shot vs tuned test accuracy per task, and write a table and a plot.

The demo is the user side only: it talks to its server over HTTP like any other client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args: argparse.Namespace) -> int:
    """Entry point of `bptvlm demo` (flags in bptvlm.cli)."""
    from bptvlm.cli.common import given_config
    from bptvlm.client.api import ClipClient
    from bptvlm.client.config import DEFAULT_PRESET, resolve_config
    from bptvlm.client.run import run_tuning
    from bptvlm.data import load_data
    from bptvlm.launch import local_server
    from bptvlm.world.tasks import list_tasks

    tasks = args.tasks.split(",") if args.tasks else [t.name for t in list_tasks(suite_only=True)]
    seeds = [int(s) for s in args.seeds.split(",")]
    base = resolve_config(args.preset or DEFAULT_PRESET, **given_config(args))  # checks the settings before serving
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runs: list[dict[str, Any]] = []
    with local_server(args.model, timeout=300, log_path=out / "server.log") as url, ClipClient(url) as client:
        model_id = client.model_metadata().parameters.get("model_id", args.model)
        for task in tasks:
            for seed in seeds:
                config = base.with_(seed=seed)
                data = load_data(task, seed=seed, shots=config.shots, val_shots=config.val_shots, image_size=0,
                                 folder=False)  # fmt: skip
                summary = run_tuning(client, data, config, out / task / f"seed{seed}", progress=not args.no_progress)
                runs.append({"task": task, "seed": seed, **summary})
                print(f"{task:<14} seed {seed}: zero-shot {summary['zero_shot_accuracy']:.3f} -> "
                      f"tuned {summary['test_accuracy']:.3f} ({summary['train_queries']} queries)", flush=True)
        usage = client.usage
    wall = time.monotonic() - start
    table = summarize(runs)
    prompts = base.variant if base.variant == "vision" else f"{base.variant}, {base.text_context} text context"
    prompts += f", {base.optimizer}, sigma {base.sigma}"
    report = format_table(table, model=model_id, variant=prompts, budget=base.budget, seeds=seeds,
                          queries=usage.candidates, wall_s=wall)
    print(report)
    (out / "demo.md").write_text(report + "\n")
    (out / "demo.json").write_text(json.dumps({"model": model_id, "config": base.to_dict(), "budget": base.budget,
                                               "seeds": seeds, "wall_s": wall, "queries": usage.candidates,
                                               "tasks": table, "runs": runs}, indent=2, default=str))
    plot(table, out / "demo.png", title=f"{model_id}: zero-shot vs BPT ({prompts}, {base.budget} queries/task)")
    print(f"wrote {out / 'demo.md'}, {out / 'demo.json'}, {out / 'demo.png'}")
    return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per task: mean and std over seeds of zero-shot and tuned test accuracy."""
    table: dict[str, dict[str, float]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        zs, zs_std = _mean_std([r["zero_shot_accuracy"] for r in mine])
        tuned, tuned_std = _mean_std([r["test_accuracy"] for r in mine])
        table[task] = {"zero_shot": zs, "zero_shot_std": zs_std, "tuned": tuned, "tuned_std": tuned_std,
                       "seeds": len(mine)}
    return table


def format_table(table: dict[str, dict[str, float]], *, model: str, variant: str, budget: int, seeds: list[int],
                 queries: int, wall_s: float) -> str:
    lines = [f"model {model}, BPT-VLM prompts: {variant}; {budget} training queries per task and seed, "
             f"seeds {','.join(map(str, seeds))}",
             "", "| task | zero-shot | tuned | gain |", "|---|---|---|---|"]
    for task, row in table.items():
        lines.append(f"| {task} | {row['zero_shot']:.3f} ± {row['zero_shot_std']:.3f} | "
                     f"{row['tuned']:.3f} ± {row['tuned_std']:.3f} | {100 * (row['tuned'] - row['zero_shot']):+.1f} |")
    zs = statistics.fmean(r["zero_shot"] for r in table.values())
    tuned = statistics.fmean(r["tuned"] for r in table.values())
    lines.append(f"| **average** | {zs:.3f} | {tuned:.3f} | {100 * (tuned - zs):+.1f} |")
    lines += ["", f"{queries} queries in all (training + evaluation), wall time {wall_s:.0f} s"]
    return "\n".join(lines)


def plot(table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar([x - 0.2 for x in xs], [table[n]["zero_shot"] for n in names], 0.4, label="zero-shot",
           yerr=[table[n]["zero_shot_std"] for n in names])
    ax.bar([x + 0.2 for x in xs], [table[n]["tuned"] for n in names], 0.4, label="BPT tuned",
           yerr=[table[n]["tuned_std"] for n in names])
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
