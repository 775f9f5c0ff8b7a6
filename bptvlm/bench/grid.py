"""The benchmark grid: axes (tasks x optimizers x variants x seeds x intrinsic dims x prompt lengths),
checkpoint budgets and the settings every cell shares; from flags or a TOML file.

A grid file holds the same names as the flags, with ``_`` for ``-`` and lists for the axes::

    tasks = ["shape", "colour_synonym"]
    optimizers = ["CMA", "DiagonalCMA"]
    budgets = [250, 500, 1000]
    seeds = [0, 1]
    variants = ["joint", "text"]
    intrinsic_dims = [500]          # d_text = d_vision = d
    feedbacks = ["logits", "label"] # client/feedback.py ("auto": loss where allowed, else the richest)
    output_noises = [0.0, 0.5]      # Gaussian noise on the logits, asked of the server (training and validation)
    output_decimals = [-1, 2]       # rounding of float outputs (-1: none)
    depths = ["1", "all"]           # prompted layers per tower (client/deep.py)
    deep_schedules = ["cycle", "joint"]
    subspaces = ["separate", "shared"]
    baselines = ["zero-shot", "ensemble", "coop", "same-shape", "linear-probe"]
    whitebox_model = "embedded"     # only with it: CoOp, same-shape and the linear probe (white-box)
    preset = "paper"                # where every setting not given comes from (client/config.py)

Settings shared by every cell (popsize, sigma, shots, val_shots, template, loss, visual_prompt_position,
text_context) have the names of ``TuneConfig``'s fields, which are also ``bptvlm tune``'s flags; what a
grid leaves out, axes included, comes from its preset (default: ``default``, as for ``tune``).

Benchmarks in CoOp's layout (``tasks = ["OxfordPets", "DTD"]``) are read under ``data_root``;
``task_budgets`` (a TOML table, task -> queries) gives a task its own run length, read off at the
grid's budgets below it and at its own; ``protocol = "base2new"`` tunes on the base classes and adds
new-class accuracy and the harmonic mean to every row. ``bptvlm bench --grid paper`` is
``grids/paper.toml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
API_BASELINES = ("zero-shot", "ensemble")
WHITEBOX_BASELINES = ("coop", "same-shape", "linear-probe")
BASELINES = API_BASELINES + WHITEBOX_BASELINES
DEFAULT_ENSEMBLE = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a photo of the {}.")


@dataclass(frozen=True)
class Grid:
    """Everything that defines a benchmark run besides the server and the output folder."""

    tasks: tuple[str, ...]
    preset: str = "default"
    optimizers: tuple[str, ...] = ()  # (): the preset's optimizer
    budgets: tuple[int, ...] = (250, 500, 1000)
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = ()  # (): the preset's variant
    intrinsic_dims: tuple[int, ...] = ()  # (): the preset's d_text (d_text = d_vision = d)
    n_ctx_text: tuple[int, ...] = (0,)  # 0: the client's default (8, or the template prefix's tokens if more)
    n_ctx_vision: tuple[int, ...] = (0,)  # 0: the client's default (5 appended, one per position for 'add')
    # Stricter services (client/feedback.py, server/outputs.py): "" = the default feedback (loss where allowed, else the richest);
    # noise 0 and decimals -1 = none beyond the server's own. Degradations apply to training and validation.
    feedbacks: tuple[str, ...] = ("",)
    output_noises: tuple[float, ...] = (0.0,)
    output_decimals: tuple[int, ...] = (-1,)
    depths: tuple[str, ...] = ()  # (): the preset's depth ("1": shallow)
    deep_schedules: tuple[str, ...] = ()  # (): the preset's; only cells with depth > 1 vary it
    subspaces: tuple[str, ...] = ()  # (): the preset's; "shared" only for the joint variant
    # None: the preset's (TuneConfig fields of the same names)
    popsize: int | None = None
    sigma: float | None = None
    shots: int | None = None
    val_shots: int | None = None
    test_per_class: int = 50
    template: str | None = None
    loss: str | None = None
    visual_prompt_position: str | None = None
    text_context: str | None = None
    baselines: tuple[str, ...] = BASELINES
    ensemble_templates: tuple[str, ...] = DEFAULT_ENSEMBLE
    whitebox_model: str | None = None
    price_per_1k_image_forwards: float = 0.01
    coop_steps: int = 300
    coop_lr: float = 0.002
    data_root: str | None = None  # where data sets by name live (CoOp's $DATA); None: BPTVLM_DATA_ROOT
    dataset_test_per_class: int = 0  # 0: a data set's whole test split (the paper's); N: a fixed N a class
    protocol: str = "all"  # or "base2new" (CoCoOp's)
    task_budgets: dict[str, int] = field(default_factory=dict)  # task -> its run's budget (default: max budgets)

    def __post_init__(self) -> None:
        from bptvlm.client.config import resolve_config  # validates names; no torch

        base = resolve_config(self.preset)
        for name in ("popsize", "sigma", "shots", "val_shots", "loss", "visual_prompt_position", "text_context"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(base, name))
        for axis, name in (("optimizers", "optimizer"), ("variants", "variant"), ("intrinsic_dims", "d_text"),
                           ("depths", "depth"), ("deep_schedules", "deep_schedule"), ("subspaces", "subspace")):
            if not getattr(self, axis):
                object.__setattr__(self, axis, (getattr(base, name),))
        for name in ("tasks", "optimizers", "budgets", "seeds", "variants", "intrinsic_dims", "n_ctx_text", "n_ctx_vision",
                     "feedbacks", "output_noises", "output_decimals", "depths", "deep_schedules", "subspaces"):
            if not getattr(self, name):
                raise ValueError(f"grid axis {name!r} is empty")
        if any(b < 1 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets must be distinct positive query counts, received {list(self.budgets)}")
        object.__setattr__(self, "budgets", tuple(sorted(self.budgets)))
        bad = {t: b for t, b in self.task_budgets.items() if int(b) < 1}
        if bad:
            raise ValueError(f"task_budgets {bad}: each budget must be >= 1")
        unused = sorted(set(self.task_budgets) - set(self.tasks))
        if unused:  # a file's table covers its tasks; --tasks may pick some of them
            logger.info("task_budgets for tasks not in this grid, ignored: %s", ", ".join(unused))
            object.__setattr__(self, "task_budgets", {t: b for t, b in self.task_budgets.items() if t in self.tasks})
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; baselines are {', '.join(BASELINES)} (or none)")
        if self.val_shots < 1:
            raise ValueError("val_shots must be >= 1: checkpoint prompts are selected on the validation split")
        from bptvlm.client.config import Template

        for t in self.ensemble_templates:
            Template(t)
        for cell in self.cells():
            cell.tune_config(self)

    @property
    def max_budget(self) -> int:
        return self.budgets[-1]

    def budgets_for(self, task: str) -> tuple[int, ...]:
        """A task's checkpoint budgets: the grid's, or with ``task_budgets`` those below its own and its own."""
        if task not in self.task_budgets:
            return self.budgets
        own = int(self.task_budgets[task])
        return tuple(sorted({b for b in self.budgets if b < own} | {own}))

    def all_budgets(self) -> tuple[int, ...]:
        """Every checkpoint budget of any task (the report's columns)."""
        return tuple(sorted({b for t in self.tasks for b in self.budgets_for(t)}))

    def training_queries(self) -> int:
        """Training queries of every black-box cell together (what a run of the whole grid spends on training)."""
        return sum(self.budgets_for(c.task)[-1] for c in self.cells())

    def cells(self) -> list[Cell]:
        """Black-box cells, task-major (a run's first cells cover every task). A shallow cell has no
        schedule (one per depth-1 cell), and a shared subspace is only for the joint variant."""
        cells = [
            Cell(task, "blackbox", opt, variant, seed, d, nt, nv, feedback=fb, output_noise=noise, output_decimals=dec,
                 depth=depth, deep_schedule=schedule if depth != "1" else "cycle", subspace=subspace)
            for seed in self.seeds
            for task in self.tasks
            for opt in self.optimizers
            for variant in self.variants
            for d in self.intrinsic_dims
            for nt in self.n_ctx_text
            for nv in self.n_ctx_vision
            for fb in self.feedbacks
            for noise in self.output_noises
            for dec in self.output_decimals
            for depth in self.depths
            for schedule in self.deep_schedules
            for subspace in self.subspaces
            if subspace == "separate" or variant == "joint"
        ]
        return list(dict.fromkeys(cells))  # depth-1 cells once, whatever the schedules

    def baseline_cells(self, whitebox: bool) -> list[Cell]:
        """Baseline cells; the white-box ones only when the model is in-process."""
        names = [b for b in self.baselines if b in API_BASELINES or whitebox]
        out = []
        for seed in self.seeds:
            for task in self.tasks:
                for name in names:
                    if name == "coop":  # same shape as the black-box text context
                        out += [Cell(task, "white-box", "coop", "text", seed, 0, nt, 0) for nt in self.n_ctx_text]
                    elif name == "same-shape":  # one ceiling per prompt form the black-box cells tune
                        shapes = dict.fromkeys((v, nt, nv, k) for v in self.variants for nt in self.n_ctx_text
                                               for nv in self.n_ctx_vision for k in self.depths)
                        out += [Cell(task, "white-box", name, v, seed, 0, nt, nv, depth=k) for v, nt, nv, k in shapes]
                    else:
                        kind = "white-box" if name in WHITEBOX_BASELINES else "api"
                        out.append(Cell(task, kind, name, "-", seed, 0, 0, 0))
        return out

    def shared(self) -> dict[str, Any]:
        """Settings that change every cell's result (part of each cell's key)."""
        keys = ("popsize", "sigma", "shots", "val_shots", "test_per_class", "template", "loss", "visual_prompt_position",
                "budgets", "ensemble_templates", "coop_steps", "coop_lr")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Cell:
    """One unit of work: a tuning run read off at every budget, or one baseline."""

    task: str
    kind: str  # "blackbox" | "api" | "white-box"
    method: str  # optimizer name or baseline name
    variant: str
    seed: int
    d: int
    n_ctx_text: int
    n_ctx_vision: int
    feedback: str = ""  # "": the default (loss where the key allows it, else the richest)
    output_noise: float = 0.0
    output_decimals: int = -1  # -1: none
    depth: str = "1"
    deep_schedule: str = "cycle"
    subspace: str = "separate"

    def degradation(self) -> str:
        """`` feedback=label noise=0.5 decimals=2`` for what is set ("" when nothing is)."""
        parts = [f"feedback={self.feedback}"] * bool(self.feedback) + [f"noise={self.output_noise:g}"] * (
            self.output_noise > 0) + [f"decimals={self.output_decimals}"] * (self.output_decimals >= 0)
        return "".join(" " + p for p in parts)

    @property
    def variant_label(self) -> str:
        """The variant as tables show it: with the depth, schedule and subspace where not shallow and separate."""
        return variant_label(asdict(self))

    def tune_config(self, grid: Grid) -> Any:
        """The client's ``TuneConfig`` of this cell (budget = the grid's largest)."""
        from bptvlm.client.config import resolve_config

        return resolve_config(
            grid.preset,
            optimizer=self.method if self.kind == "blackbox" else "CMA",
            popsize=grid.popsize,
            budget=grid.budgets_for(self.task)[-1],
            seed=self.seed,
            d_text=max(self.d, 1),
            d_vision=max(self.d, 1),
            n_ctx_text=self.n_ctx_text or None,
            n_ctx_vision=self.n_ctx_vision or None,
            sigma=grid.sigma,
            template=grid.template,
            loss=grid.loss,
            visual_prompt_position=grid.visual_prompt_position,
            # baselines tune no context through the API (same-shape reads the grid's form in-process)
            text_context=grid.text_context if self.kind == "blackbox" else "shared",
            variant=self.variant if self.kind == "blackbox" else "text",
            shots=grid.shots,
            val_shots=grid.val_shots,
            protocol=grid.protocol,
            feedback=self.feedback or None,
            output_noise=self.output_noise,
            output_decimals=self.output_decimals if self.output_decimals >= 0 else None,
            **({"depth": self.depth, "deep_schedule": self.deep_schedule, "subspace": self.subspace}
               if self.kind == "blackbox" else {}),
        )

    def key(self, grid: Grid, model_id: str) -> str:
        """File name: readable fields and a hash of everything that shapes the result."""
        settings = grid.shared()
        if (self.kind == "blackbox" or self.method == "same-shape") and self.variant != "vision" and grid.text_context != "shared":
            # only the tuned text context depends on it; keyed only when set, so cells cached before it existed stay valid
            settings["text_context"] = grid.text_context
        if self.task in grid.task_budgets:  # keyed only when set, as above
            settings["budgets"] = list(grid.budgets_for(self.task))
        if grid.protocol != "all":
            settings["protocol"] = grid.protocol
        if grid.dataset_test_per_class:
            settings["dataset_test_per_class"] = grid.dataset_test_per_class
        cell = asdict(self)
        for name, unset in UNSET_AXES.items():  # keyed only when set, so cells cached before these axes stay valid
            if cell[name] == unset:
                del cell[name]
        blob = json.dumps({"cell": cell, "grid": settings, "model": model_id}, sort_keys=True, default=list)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        safe_task = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.task)[-40:]
        parts = [safe_task, self.method, self.variant.replace("-", "none"), f"s{self.seed}"]
        if self.kind == "blackbox":
            parts += [f"d{self.d}", f"t{self.n_ctx_text}v{self.n_ctx_vision}"]
            parts += [self.degradation().strip().replace("=", "").replace(" ", "_").replace(":", "")] * bool(self.degradation())
            if self.depth != "1":
                parts.append(f"k{self.depth}{self.deep_schedule}")
            if self.subspace != "separate":
                parts.append(self.subspace)
        elif self.method == "same-shape":
            parts += [f"t{self.n_ctx_text}v{self.n_ctx_vision}"]
        return "__".join(parts + [digest])


DEEP_DEFAULTS = {"depth": "1", "deep_schedule": "cycle", "subspace": "separate"}
# Cell fields left out of a cell's key at these values (cells cached before the axes existed keep their keys)
UNSET_AXES = {"feedback": "", "output_noise": 0.0, "output_decimals": -1, **DEEP_DEFAULTS}


def variant_label(cell: dict[str, Any]) -> str:
    """``joint``, ``joint deep=all cycle``, ``joint shared``... from a cell's fields (as stored)."""
    parts = [str(cell["variant"])]
    if cell.get("depth", "1") != "1":
        parts.append(f"deep={cell['depth']} {cell.get('deep_schedule', 'cycle')}")
    if cell.get("subspace", "separate") != "separate":
        parts.append(str(cell["subspace"]))
    return " ".join(parts)


def _coerce(name: str, value: Any) -> Any:
    """A grid field from a TOML value or a comma-separated flag."""
    types = {f.name: f.type for f in fields(Grid)}
    kind = str(types[name])
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise ValueError(f"grid key {name!r} must be a TOML table (task = queries), received {value!r}")
        return {str(k): int(v) for k, v in value.items()}
    if kind.startswith("tuple"):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [i.strip() if isinstance(i, str) else i for i in items if not (isinstance(i, str) and not i.strip())]
        if "int" in kind:
            return tuple(int(i) for i in items)
        if "float" in kind:
            return tuple(float(i) for i in items)
        if name == "feedbacks":
            return tuple("" if str(i) in ("auto", "") else str(i) for i in items)
        if name == "baselines" and items in (["none"], []):
            return ()
        return tuple(str(i) for i in items)
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return None if value is None else str(value)


GRID_FIELDS = tuple(f.name for f in fields(Grid))
FILE_ONLY = {"endpoint", "out", "model", "api_key_env"}  # run settings a grid file may carry besides the grid


GRIDS_DIR = Path(__file__).parent / "grids"


def grid_path(spec: str | Path) -> Path:
    """A grid file, or the name of one shipped in ``bptvlm/bench/grids`` (``paper``)."""
    path = Path(spec)
    if path.is_file() or path.suffix == ".toml" or "/" in str(spec):
        return path
    shipped = GRIDS_DIR / f"{spec}.toml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.toml")))
        raise ValueError(f"--grid {spec}: no such file, and no shipped grid of that name (shipped: {names})")
    return shipped


def load_grid_file(path: str | Path) -> dict[str, Any]:
    """The TOML file (or a shipped grid's name) as a dict (YAML is not supported: TOML is in the standard library)."""
    path = grid_path(path)
    with path.open("rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(GRID_FIELDS) - FILE_ONLY)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; keys are {', '.join(sorted((*GRID_FIELDS, *FILE_ONLY)))}")
    return data


def make_grid(values: dict[str, Any]) -> Grid:
    """A ``Grid`` from flag/file values (``None`` = not given: the default applies)."""
    given = {k: _coerce(k, v) for k, v in values.items() if k in GRID_FIELDS and v is not None}
    if "tasks" not in given:
        raise ValueError("no tasks: give --tasks or 'tasks' in the grid file")
    return Grid(**given)


