"""``bptvlm bench``: accuracy against query budgets for optimizers, prompt variants and baselines.

    grid (grid.py) -> cells -> one tuning run per cell through the API (runner.py), read off at each
    checkpoint budget -> atomic cell files (store.py) -> results.csv / results.jsonl / report.md / PNGs
    (report.py). Baselines: zero-shot and template ensemble through the API (runner.py); CoOp and a
    linear probe in-process, white-box (whitebox.py).
"""
