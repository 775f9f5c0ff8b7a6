"""How much of the full-logits gain each feedback objective keeps (a section of report.md).

For every black-box method of a grid that varies ``feedbacks``, ``output_noises`` or ``output_decimals``:
the mean test accuracy over the tasks (and seeds) at each budget, and the fraction of the reference's
gain over zero-shot it keeps, ``(acc - zero_shot) / (acc_reference - zero_shot)``, each a mean over the
same tasks and seeds. The reference is the same optimizer and variant with ``feedback=logits`` and no
degradation; without such cells, no section.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

REFERENCE = "logits"


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _is_reference(row: dict[str, Any]) -> bool:
    return row.get("feedback") == REFERENCE and not row.get("output_noise") and row.get("output_decimals", -1) < 0


def gain_table(rows: list[dict[str, Any]], budgets: list[int]) -> str | None:
    """Markdown lines: method | mean test accuracy at each budget | fraction of the logits gain kept; or None."""
    blackbox = [r for r in rows if r.get("kind") == "blackbox"]
    varied = {(r.get("feedback"), r.get("output_noise"), r.get("output_decimals")) for r in blackbox}
    if len(varied) < 2:
        return None
    zero = {(r["task"], r["seed"]): r["test_accuracy"] for r in rows if r.get("optimizer") == "zero-shot"}
    acc: dict[tuple[str, str], dict[int, dict[tuple[str, int], float]]] = defaultdict(lambda: defaultdict(dict))
    for r in blackbox:
        if r.get("test_accuracy") is not None:
            acc[(r["optimizer"], r["variant"])][int(r["budget"])][(r["task"], r["seed"])] = float(r["test_accuracy"])
    refs = {(m.split(" ")[0], v): (m, v) for (m, v) in acc
            if any(_is_reference(r) for r in blackbox if (r["optimizer"], r["variant"]) == (m, v))}
    head = "| method | variant | " + " | ".join(f"{b} q: acc (gain kept)" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (2 + len(budgets))]
    for (method, variant), by_budget in sorted(acc.items()):
        ref = refs.get((method.split(" ")[0], variant))
        cells = []
        for b in budgets:
            mine = by_budget.get(b, {})
            base = acc[ref][b] if ref else {}
            runs = [k for k in mine if k in zero and k in base]
            a = _mean([mine[k] for k in mine])
            if a is None:
                cells.append("-")
                continue
            z, full = _mean([zero[k] for k in runs]), _mean([base[k] for k in runs])
            kept = "" if z is None or full is None or abs(full - z) < 1e-9 else \
                f" ({(_mean([mine[k] for k in runs]) - z) / (full - z):.0%})"  # type: ignore[operator]
            cells.append(f"{a:.3f}{kept}")
        lines.append(f"| {method} | {variant} | " + " | ".join(cells) + " |")
    zs = _mean(list(zero.values()))
    note = f"zero-shot mean over the same tasks: {zs:.3f}" if zs is not None else "no zero-shot cells"
    return "\n".join(["## Gain kept by each feedback", "",
                      "Mean test accuracy over tasks and seeds; in brackets the fraction of the `feedback=logits` "
                      f"gain over zero-shot it keeps (same optimizer and variant; {note}).", "", *lines, ""])
