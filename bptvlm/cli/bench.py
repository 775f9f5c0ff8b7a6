"""``bptvlm bench``: its parser and command. Heavy imports (torch, nevergrad) happen in the command."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

from .common import API_KEY_ENV, DEFAULT_ENDPOINT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_command

DESCRIPTION = """\
Benchmark black-box prompt tuning against query budgets. For every cell of the grid (task x optimizer x
variant x seed x intrinsic dim x prompt lengths) one tuning run goes through the API up to the largest
budget; at each checkpoint budget the prompt is selected on a validation split drawn from the training
pool (never on test) and its validation and test accuracy are recorded. Queries are counted in the
paper's unit (candidates evaluated), next to HTTP requests, image forwards (as the server reports them),
wall time and a simulated price; validation/test evaluations are counted apart.

Baselines in the same tables, on the same images: zero-shot with the task's template and an ensemble of
templates (averaged logits), both through the API; CoOp (gradient-trained shared text context of the
same length), same-shape (each black-box cell's own prompt form: text-context form, visual prompt and
placement, trained by gradient; the report gives black-box as a fraction of it) and a linear probe on
frozen image features, all WHITE-BOX (the ceiling, not competitors) and run only when the served model
is available in-process (--whitebox-model, checked to be the same weights).

Writes OUT/results.csv (one row per cell and checkpoint budget), results.jsonl, report.md and
plot_<task>_<variant>.png. Resumable: each finished cell is saved atomically in OUT/cells/, and rerunning
the same command skips it (Ctrl-C loses at most the cell in flight)."""

EPILOG = """\
grid file (TOML; keys as the long flags with '_' for '-', lists for the axes; flags given on the
command line override it):
  endpoint = "http://127.0.0.1:8000"
  out = "bench/run1"
  tasks = ["shape", "colour_synonym"]     # built-in tasks or ImageFolder directories
  optimizers = ["CMA", "DiagonalCMA"]
  budgets = [250, 500, 1000]
  seeds = [0, 1]
  variants = ["joint", "text"]
  intrinsic_dims = [500]
  whitebox_model = "embedded"

example:
  bptvlm bench --endpoint http://127.0.0.1:8000 --tasks shape,colour_synonym --optimizers CMA,DiagonalCMA \\
      --budgets 250,500,1000 --seeds 0,1 --variants joint,text --whitebox-model embedded --out bench/run1"""


def add_commands(subparsers: Any) -> None:
    """Register ``bench`` on the top-level parser's subparsers."""
    from bptvlm.client.config import DEFAULT_PRESET, PRESETS
    from bptvlm.client.projection import PLACEMENTS, TEXT_CONTEXTS  # numpy only: no torch, no nevergrad

    p = subparsers.add_parser(
        "bench",
        help="accuracy vs. query budget for optimizers, prompt variants and baselines (resumable)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("grid (comma-separated lists; or --grid FILE)")
    src.add_argument("--grid", metavar="FILE.toml", help="read the grid (and endpoint/out) from a TOML file, or a shipped "
                     "grid by name: 'paper' (BPT-VLM's table: its nine data sets, budgets and seeds 1-3)")
    src.add_argument("--dry-run", dest="dry_run", action="store_true",
                     help="list the cells and the training queries they would spend, and whether each task's data is "
                     "found; ask no server")
    src.add_argument("--preset", choices=list(PRESETS),
                     help=f"where every setting and axis not given comes from, as for `tune` (default: {DEFAULT_PRESET})")
    src.add_argument("--tasks", help="built-in task names (`bptvlm tasks list`), ImageFolder directories or data sets "
                     "by name in CoOp's layout under --data-root (OxfordPets, DTD, ...)")
    src.add_argument("--data-root", dest="data_root", metavar="DIR",
                     help="where data sets by name live (CoOp's $DATA; default: the environment variable BPTVLM_DATA_ROOT)")
    src.add_argument("--protocol", choices=["all", "base2new"],
                     help="base2new: tune on the first half of the classes, report base, new and harmonic mean (default: all)")
    src.add_argument("--dataset-test-per-class", dest="dataset_test_per_class", type=int,
                     help="test images a class of a data set by name, a fixed draw (default: 0 = its whole test split)")
    src.add_argument("--optimizers", help="names in nevergrad's registry (default: the preset's)")
    src.add_argument("--budgets", help="checkpoint budgets in training queries; one run per cell up to the largest (default: 250,500,1000)")
    src.add_argument("--seeds", help="seeds of the few-shot sample, the projection and the optimizer (default: 0)")
    src.add_argument("--variants", help="joint, text, vision (default: the preset's)")
    src.add_argument("--intrinsic-dims", dest="intrinsic_dims", help="d of z per modality (d_text = d_vision) (default: the preset's)")
    src.add_argument("--n-ctx-text", dest="n_ctx_text",
                     help="text context lengths (default: 0 = the client's default: 8, or the template prefix's tokens if more)")
    src.add_argument("--n-ctx-vision", dest="n_ctx_vision",
                     help="visual prompt lengths (default: 0 = 5 appended tokens, or one per position for 'add')")
    src.add_argument("--feedbacks", help="feedback objectives: logits, probs, loss, topk[:K], label, auto (default: auto, "
                     "the server's loss where the key allows it, else the richest it allows)")
    src.add_argument("--output-noises", dest="output_noises", help="Gaussian noise on the logits asked of the server "
                     "for training and validation (default: 0)")
    src.add_argument("--output-decimals", dest="output_decimals", help="rounding of float outputs asked of the server "
                     "(default: -1 = none)")
    src.add_argument("--depths", help="prompted layers per tower: 1 (shallow), K or all (default: the preset's, 1)")
    src.add_argument("--deep-schedules", dest="deep_schedules", help="cycle (the paper's: a layer per generation, in turn) "
                     "or joint (one z for every layer); varies only cells with depth > 1 (default: cycle)")
    src.add_argument("--subspaces", help="separate or shared (one z for text and visual prompts; joint variant only) "
                     "(default: separate)")
    st = p.add_argument_group("settings shared by every cell")
    st.add_argument("--popsize", type=int, help="candidates per generation = per request (default: the preset's)")
    st.add_argument("--sigma", type=float, help="projection scale (default: the preset's)")
    st.add_argument("--shots", type=int, help="training images per class (default: the preset's)")
    st.add_argument("--val-shots", dest="val_shots", type=int, help="validation images per class, from the training pool (default: the preset's)")
    st.add_argument("--test-per-class", dest="test_per_class", type=int, help="test images per class of built-in tasks (default: 50)")
    st.add_argument("--template", help="prompt template with one '{}' (default: each task's own)")
    st.add_argument("--loss", choices=["ce", "focal"], help="training loss (default: the preset's)")
    st.add_argument("--visual-prompt-position", dest="visual_prompt_position", choices=PLACEMENTS, help="(default: the preset's)")
    st.add_argument("--text-context", dest="text_context", choices=TEXT_CONTEXTS,
                    help="one text context for every class (the paper's), one per class, or both added up (default: the preset's)")
    st.add_argument("--price-per-1k-image-forwards", dest="price_per_1k_image_forwards", type=float,
                    help="simulated price of 1,000 image forwards (default: 0.01)")
    bl = p.add_argument_group("baselines")
    bl.add_argument("--baselines", help="zero-shot, ensemble, coop, same-shape, linear-probe, or none (default: all; the white-box "
                    "ones need --whitebox-model)")
    bl.add_argument("--ensemble-templates", dest="ensemble_templates", help="templates averaged by 'ensemble', '|'-separated")
    bl.add_argument("--whitebox-model", "--model-dir", dest="whitebox_model", metavar="SPEC",
                    help="the served model in-process for CoOp and the linear probe: embedded, tiny-random or a "
                    "save_pretrained directory (must be the weights the server serves)")
    bl.add_argument("--coop-steps", dest="coop_steps", type=int, help="CoOp AdamW steps, full batch (default: 300)")
    bl.add_argument("--coop-lr", dest="coop_lr", type=float, help="CoOp learning rate (default: 0.002)")
    sv = p.add_argument_group("server and output")
    sv.add_argument("--endpoint", help="base URL of the bptvlm server (default: http://127.0.0.1:8000)")
    sv.add_argument("--served-model", dest="model_name", metavar="NAME",
                    help="name of the served model, as in /v2/models/{name} (default: clip)")
    from .common import _DeprecatedModel

    sv.add_argument("--model", dest="model_name", action=_DeprecatedModel, help=argparse.SUPPRESS)
    sv.add_argument("--api-key", help=f"bearer token (default: the environment variable {API_KEY_ENV})")
    sv.add_argument("--out", type=Path, help="output folder (default: bench/run1); a folder holding another grid's "
                    "benchmark is refused")
    sv.add_argument("--overwrite", action="store_true", help="replace the report, tables and plots of another grid in "
                    "--out (finished cell files stay: each is keyed by everything that shapes its result)")
    sv.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    p.set_defaults(func=cmd_bench)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """Grid-file values overlaid with the flags given on the command line."""
    from bptvlm.bench.grid import load_grid_file

    values: dict[str, Any] = load_grid_file(args.grid) if args.grid else {}
    for key, value in vars(args).items():
        if value is not None and key not in ("grid", "func", "command", "no_progress", "overwrite", "dry_run", "argv"):
            values[key] = value
    if isinstance(values.get("ensemble_templates"), str):
        values["ensemble_templates"] = values["ensemble_templates"].split("|")
    if "model" in values:
        values.setdefault("model_name", values.pop("model"))
    return values


def dry_run(grid: Any) -> int:
    """Print the grid's cells and the training queries they would spend; ask no server."""
    from bptvlm.client.data import DataError
    from bptvlm.data import check_source

    cells = grid.cells()
    print(f"{len(cells)} black-box cells, {len(grid.baseline_cells(bool(grid.whitebox_model)))} baseline cells "
          f"({', '.join(grid.baselines) or 'none'}); protocol {grid.protocol}")
    print("| task | optimizer | variant | seed | d | budgets |\n|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c.task} | {c.method} | {c.variant_label} | {c.seed} | {c.d} | {', '.join(map(str, grid.budgets_for(c.task)))} |")
    print(f"total training queries: {grid.training_queries()} (evaluation queries apart)")
    for task in grid.tasks:
        try:
            check_source(task, data_root=grid.data_root)
            print(f"data {task}: found{_sizes(task, grid)}")
        except (DataError, ValueError, OSError) as exc:
            print(f"data {task}: MISSING: {exc}")
    return EXIT_OK


IMAGE_BYTES_224 = 224 * 224 * 3  # one uploaded image at ViT-B/32's 224 px


def _sizes(task: str, grid: Any) -> str:
    """A data set's images a run uploads (training shots, test split) and their bytes at 224 px."""
    from bptvlm.data import is_dataset

    if not is_dataset(task):
        return ""
    from bptvlm.client.datasets import open_dataset

    dataset = open_dataset(task, grid.data_root)
    train = grid.shots * len(dataset.class_names)
    test = len(dataset.splits.items["test"])
    if grid.dataset_test_per_class:
        test = min(test, grid.dataset_test_per_class * len(dataset.class_names))
    mib = max(train, test) * IMAGE_BYTES_224 / 2**20
    return (f": {len(dataset.class_names)} classes, up to {train} training and {test} test images (the largest upload "
            f"{mib:,.0f} MiB at 224 px; the server's defaults take 256 MiB a request (--max-body-bytes), 4,096 images "
            "a batch (BPTVLM_MAX_IMAGES) and 1 GiB of cached images (BPTVLM_IMAGE_CACHE_BYTES))")


def cmd_bench(args: argparse.Namespace) -> int:
    """``bptvlm bench``: run the grid, print where the outputs are."""
    from bptvlm.bench.grid import make_grid

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        from bptvlm.data import check_source

        values = _values(args)
        grid = make_grid(values)
        if args.dry_run:
            return dry_run(grid)
        for task in grid.tasks:  # locally, before any server is asked: a name that is both a task and a folder fails
            check_source(task, data_root=grid.data_root)
    except (ValueError, KeyError, OSError) as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    endpoint = values.get("endpoint") or DEFAULT_ENDPOINT

    def body() -> int:
        from bptvlm.bench.harness import BenchRun, run_grid

        from .common import command_line

        run = BenchRun(grid=grid, out=Path(values.get("out") or "bench/run1"), endpoint=endpoint,
                       api_key=values.get("api_key") or os.environ.get(API_KEY_ENV) or None,
                       model_name=values.get("model_name") or "clip", progress=not args.no_progress,
                       command=command_line(args), overwrite=args.overwrite)  # fmt: skip
        try:
            outcome = run_grid(run)
        except KeyboardInterrupt:
            print(f"interrupted; finished cells are in {run.out}/cells; rerun the same command to resume")
            return EXIT_INTERRUPTED
        print(f"{outcome.ran} cells run, {outcome.skipped} already finished, {outcome.left} left; {outcome.wall_s:.0f} s")
        print(f"results: {run.out / 'results.csv'}, report: {run.out / 'report.md'}")
        return EXIT_OK

    return run_command(body, endpoint)
