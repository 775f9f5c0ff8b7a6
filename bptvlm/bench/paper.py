"""The paper's reported numbers (BPT-VLM, Yu et al., IJCAI 2023: ViT-B/32, 16 shots, CMA-ES, test
accuracy %; /work/shared/docs/PAPER.md "Reported results") and the reference code's budgets
(configs/shallow_prompt.yaml and deep_prompt.yaml of github.com/ECNU-ICALK/BPT-VLM, the same in both),
keyed by our data-set names; and the report section that puts ours beside them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

# data set -> (shallow, deep)
REPORTED: dict[str, tuple[float, float]] = {
    "ImageNet": (65.08, 64.84), "SUN397": (68.01, 69.83), "Caltech101": (94.16, 93.39), "OxfordPets": (90.43, 90.62),
    "StanfordCars": (64.72, 67.84), "Food101": (81.31, 81.38), "DTD": (60.52, 64.13), "EuroSAT": (86.11, 89.37),
    "UCF101": (74.62, 76.66),
}  # fmt: skip
REPORTED_AVERAGE = (76.11, 77.56)
BUDGETS: dict[str, int] = {
    "ImageNet": 14400, "SUN397": 18000, "Caltech101": 3600, "OxfordPets": 3600, "StanfordCars": 25200,
    "Food101": 3600, "DTD": 36000, "EuroSAT": 25200, "UCF101": 25200,
}  # fmt: skip


def _canonical(task: str) -> str | None:
    from bptvlm.data import is_dataset

    if not is_dataset(task):
        return None
    from bptvlm.client.datasets import get_dataset

    name = get_dataset(task).name
    return name if name in REPORTED else None


def beside_the_paper(rows: list[dict[str, Any]]) -> str | None:
    """Markdown: per paper data set, the paper's shallow/deep and our black-box methods at their
    task's final budget (mean ± std over seeds) and zero-shot; None when no task is one of the paper's."""
    final: dict[str, int] = {}
    for r in rows:
        if r["kind"] == "blackbox":
            final[r["task"]] = max(final.get(r["task"], 0), int(r["budget"]))
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if _canonical(r["task"]) is None:
            continue
        if r["kind"] == "blackbox" and int(r["budget"]) == final.get(r["task"]):
            acc[(r["task"], f"{r['optimizer']} {r['variant']}")].append(float(r["test_accuracy"]))
        elif r["kind"] == "api" and r["optimizer"] == "zero-shot":
            acc[(r["task"], "zero-shot")].append(float(r["test_accuracy"]))
    if not acc:
        return None
    methods = sorted({m for _, m in acc if m != "zero-shot"}) + (["zero-shot"] if any(m == "zero-shot" for _, m in acc) else [])
    lines = ["| data set | paper shallow | paper deep | budget | " + " | ".join(methods) + " |",
             "|" + "---|" * (4 + len(methods))]
    for task in sorted({t for t, _ in acc}, key=lambda t: list(REPORTED).index(_canonical(t) or "")):
        shallow, deep = REPORTED[_canonical(task) or ""]
        cells = []
        for m in methods:
            v = np.array(acc.get((task, m), []))
            cells.append(f"{100 * v.mean():.2f} ± {100 * v.std():.2f}" if len(v) else "")
        lines.append(f"| {task} | {shallow:.2f} | {deep:.2f} | {final.get(task, '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
