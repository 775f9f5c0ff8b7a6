"""Text-only, vision-only and joint prompts side by side, through the API, on the embedded model.

    python scripts/compare_variants.py --tasks shape,count,uci_digit,shape_synonym --seeds 0

One server; for every task and seed, every configuration below is tuned over the default preset
(client/config.py: DiagonalCMA, population 30, 2,000 training queries, 16 shots) and its test accuracy
printed next to zero-shot. Configurations: text with one context for every class (the paper's), one per class (CoOp's
class-specific context) or both added up (mixed, ours); vision and joint with the paper's placement
(pre_ln) and with our two (post_ln: appended after the pre-layer-norm; add: one vector added to each
vision position); joint with the mixed text context; deep prompts at every layer (cycle: the paper's
schedule, joint: one z for every layer; "add": deep prompts added to the states, ours) and the shared
subspace (one z for both prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bptvlm.client.api import ClipClient
from bptvlm.client.config import resolve_config
from bptvlm.client.run import run_tuning
from bptvlm.data import load_data
from bptvlm.launch import local_server

CONFIGS = {
    "text": {"variant": "text", "text_context": "shared"},
    "text per_class": {"variant": "text", "text_context": "per_class"},
    "text mixed": {"variant": "text", "text_context": "mixed"},
    "vision pre_ln": {"variant": "vision", "visual_prompt_position": "pre_ln"},
    "vision add": {"variant": "vision", "visual_prompt_position": "add"},
    "joint pre_ln": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "shared"},
    "joint post_ln": {"variant": "joint", "visual_prompt_position": "post_ln", "text_context": "shared"},
    "joint add": {"variant": "joint", "visual_prompt_position": "add", "text_context": "shared"},
    "joint pre_ln mixed": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed"},
    "joint add mixed": {"variant": "joint", "visual_prompt_position": "add", "text_context": "mixed"},
    # deep prompts (every layer of each tower) and the shared subspace (client/deep.py)
    "text mixed deep cycle": {"variant": "text", "text_context": "mixed", "depth": "all", "deep_schedule": "cycle"},
    "text mixed deep joint": {"variant": "text", "text_context": "mixed", "depth": "all", "deep_schedule": "joint"},
    "joint pre_ln mixed deep cycle": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed",
                                      "depth": "all", "deep_schedule": "cycle"},
    "joint pre_ln mixed deep joint": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed",
                                      "depth": "all", "deep_schedule": "joint"},
    "text mixed deep cycle add": {"variant": "text", "text_context": "mixed", "depth": "all", "deep_schedule": "cycle",
                                  "deep_prompt_mode": "add"},
    "text mixed deep joint add": {"variant": "text", "text_context": "mixed", "depth": "all", "deep_schedule": "joint",
                                  "deep_prompt_mode": "add"},
    "joint pre_ln mixed deep cycle add": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed",
                                          "depth": "all", "deep_schedule": "cycle", "deep_prompt_mode": "add"},
    "joint pre_ln mixed deep joint add": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed",
                                          "depth": "all", "deep_schedule": "joint", "deep_prompt_mode": "add"},
    "joint pre_ln mixed shared": {"variant": "joint", "visual_prompt_position": "pre_ln", "text_context": "mixed",
                                  "subspace": "shared"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tasks", default="shape,count,uci_digit,shape_synonym")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--sigma", type=float, default=1.0, help="projection scale of every configuration (paper: 1.0)")
    parser.add_argument("--optimizers", default="DiagonalCMA",
                        help="comma-separated strategies; every configuration runs with each (columns 'CONFIG @ OPT')")
    parser.add_argument("--out", default="runs/variants")
    args = parser.parse_args()
    tasks, seeds, configs = args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    optimizers = args.optimizers.split(",")
    try:
        for opt in optimizers:
            resolve_config("default", optimizer=opt)
    except ValueError as exc:
        parser.error(str(exc))
    # one column per configuration and strategy; the strategy is named only when several are compared
    runs = [(f"{c} @ {o}" if len(optimizers) > 1 else c, c, o) for c in configs for o in optimizers]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list[float]]] = {}
    start = time.monotonic()
    with local_server(args.model, timeout=300, log_path=out / "server.log") as url, ClipClient(url) as client:
        for task in tasks:
            row = rows.setdefault(task, {})
            for seed in seeds:
                for name, base, opt in runs:
                    config = resolve_config("default", budget=args.budget, seed=seed, sigma=args.sigma, optimizer=opt,
                                            **CONFIGS[base])  # fmt: skip
                    data = load_data(task, seed=seed, shots=config.shots, val_shots=config.val_shots, image_size=0,
                                     folder=False)
                    t0 = time.monotonic()
                    folder = name.replace(" @ ", "@").replace(" ", "-")
                    s = run_tuning(client, data, config, out / task / folder / f"seed{seed}", progress=False)
                    if name == runs[0][0]:  # one zero-shot per task and seed
                        row.setdefault("zero-shot", []).append(s["zero_shot_accuracy"])
                    row.setdefault(name, []).append(s["test_accuracy"])
                    print(f"{task:14s} seed {seed} {name:24s} zero-shot {s['zero_shot_accuracy']:.3f} -> "
                          f"{s['test_accuracy']:.3f} (best seen {s['test_accuracy_best']:.3f}, selected "
                          f"{s['selected']}) {time.monotonic() - t0:.0f} s", flush=True)
    columns = ["zero-shot", *(name for name, _, _ in runs)]
    lines = [f"model {args.model}, default preset, {args.optimizers}, {args.budget} training queries, sigma {args.sigma}, seeds {args.seeds}: "
             "test accuracy",
             "", "| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task, row in rows.items():
        lines.append(f"| {task} | " + " | ".join(f"{statistics.fmean(row[c]):.3f}" for c in columns) + " |")
    means = [statistics.fmean(statistics.fmean(rows[t][c]) for t in rows) for c in columns]
    lines.append("| **average** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines.append(f"\nwall time {time.monotonic() - start:.0f} s")
    report = "\n".join(lines)
    print(report)
    (out / "variants.md").write_text(report + "\n")
    (out / "variants.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
