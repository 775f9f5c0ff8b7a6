"""The one configuration of a tuning run, its presets, and the hand-written template.

``TuneConfig``'s fields carry their help text in ``metadata``: the CLI flags (``bptvlm tune``), the
bench grid keys and the Python API's keyword arguments are generated from them, so a default is
written once, here. ``TuneConfig()`` is the paper's method; ``resolve_config(preset, **overrides)``
is how every entry point builds one (``PRESETS``: ``paper``, and ``default``, the best configuration
measured on the embedded suite).

Imports no nevergrad or torch: the bench and CLI parsers load this module.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .deep import DEEP_MODES, SCHEDULES, SUBSPACES, check_depth
from .projection import PLACEMENTS, TEXT_CONTEXTS

DEFAULT_TEMPLATE = "a photo of a {}."
LOSSES = ("ce", "focal")
PROTOCOLS = ("all", "base2new")
# variant -> (tune text, tune vision)
VARIANTS: dict[str, tuple[bool, bool]] = {"joint": (True, True), "text": (True, False), "vision": (False, True)}
DEFAULT_N_CTX_TEXT = 8  # the paper's context length; longer only when the template prefix needs more tokens
DEFAULT_N_CTX_VISION = 5  # the paper's visual prompt tokens (appended placements)


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TuneConfig:
    """Everything that defines a tuning run besides the data and the server. Defaults: the paper's."""

    optimizer: str = _f("CMA", "search strategy: SPSA (batched, ours) or a name in nevergrad's registry (CMA is "
                        "pycma's standard CMA-ES at --popsize, the paper's)")
    popsize: int = _f(30, "candidates per generation = per request")
    budget: int = _f(600, "training queries (evaluated candidates); the last generation is truncated to hit it exactly")
    seed: int = _f(0, "seed of the few-shot sample, the projections and the optimizer")
    variant: str = _f("joint", "which prompts to tune: text context, visual prompt, or both", choices=tuple(VARIANTS))
    d_text: int = _f(500, "dimensions of z for the text context", flag="--intrinsic-dim-text")
    d_vision: int = _f(500, "dimensions of z for the visual prompt", flag="--intrinsic-dim-vision")
    n_ctx_text: int | None = _f(None, "text context vectors; the first start at the template's leading words, the rest "
                                "at zero (default: 8, the paper's, or more if those words need more tokens)")
    n_ctx_vision: int | None = _f(None, "visual prompt vectors (default: 5 appended tokens; one per vision position "
                                  "for 'add')")
    text_context: str = _f("shared", "one text context shared by every class (shared, the paper's), one per class "
                           "(per_class, CoOp's), or both added up, half of z each (mixed, ours)", choices=TEXT_CONTEXTS)
    sigma: float = _f(1.0, "scale of the random projections (the paper's sigma)")
    template: str | None = _f(None, "hand-written prompt with one '{}' for the class name; its words before '{}' "
                              f"initialise the text context (default: the task's template, else {DEFAULT_TEMPLATE!r})")
    loss: str = _f("ce", "training loss computed by the server", choices=LOSSES)
    visual_prompt_position: str = _f("pre_ln", "visual prompt tokens appended before the vision pre-layer-norm (pre_ln, "
                                     "the paper's) or after it (post_ln, ours), or one vector added to each vision "
                                     "position after it (add, ours: a zero prompt is no prompt)", choices=PLACEMENTS)
    shots: int = _f(16, "training images per class (data loaded by name or folder)")
    val_shots: int = _f(8, "validation images per class, from the training pool left after --shots (data loaded by "
                        "name or folder); the final prompt (best seen, recommendation or the untuned template) is "
                        "chosen on them by accuracy, ties by loss; 0: by training loss")
    eval_every: int | None = _f(None, "every this many training queries, the validation accuracy of the best-so-far "
                                "prompt goes into progress.jsonl and curves.png (one evaluation query each, counted "
                                "apart from the budget; default: a tenth of the budget; 0: never)")
    dataset: str | None = _f(None, "a benchmark by name in CoOp's layout under --data-root (ImageNet, SUN397, Caltech101, "
                             "OxfordPets, StanfordCars, Food101, DTD, EuroSAT, UCF101, Flowers102, FGVCAircraft); its "
                             "splits, class names and CoOp's template; shots drawn as CoOp draws them for --seed")
    data_root: str | None = _f(None, "the folder holding the --dataset folders (CoOp's $DATA: oxford_pets/, dtd/, ...; "
                               "default: the environment variable BPTVLM_DATA_ROOT)")
    protocol: str = _f("all", "all: tune and test on every class; base2new (CoCoOp's): tune on the first half of the "
                       "classes by label and report base_accuracy, new_accuracy (the other half, never seen) and "
                       "harmonic_mean", choices=PROTOCOLS)
    feedback: str | None = _f(None, "what the optimizer is told (client/feedback.py): cross-entropy from logits or "
                              "probs, the server's loss, a top-K cross-entropy with the unseen mass (topk or topk:K), "
                              "or the error rate of hard labels (label); default: the server's loss where the key's "
                              "output policy allows it (the same cross-entropy, the smallest reply), else the richest "
                              "it allows (the model metadata says which)")
    output_noise: float = _f(0.0, "ask the server for training and validation outputs with at least this much Gaussian "
                             "noise on the logits (a noisier service, simulated by the server; its own noise applies "
                             "if larger; test accuracy is measured without it)")
    output_decimals: int | None = _f(None, "ask the server to round training and validation outputs to at most this "
                                     "many decimals (as --output-noise: the coarser of it and the server's applies)")
    depth: str = _f("1", "prompted layers of each tower: 1 is shallow (the prompts enter before layer 0 only); K > 1 "
                    "also replaces the prompt positions at the input of layers 1..K-1 (capped at each tower's depth), "
                    "'all' at every layer (the paper's deep variant)")
    deep_schedule: str = _f("cycle", "with --depth > 1: one projection and optimizer per layer, optimised in turn one "
                            "generation each (cycle, the paper's), or one z for every layer, each through its own "
                            "projection (joint, ours)", choices=SCHEDULES)
    subspace: str = _f("separate", "z's text and visual parts apart (separate, the paper's) or one vector of "
                       "--intrinsic-dim-text dimensions projected to both prompts (shared, ours; variant joint)",
                       choices=SUBSPACES)
    deep_prompt_mode: str = _f("replace", "with --depth > 1: a layer's prompt replaces the prompt positions' hidden "
                               "states (replace, the paper's) or is added to them (add, ours: z = 0 is then exactly the "
                               "shallow prompt)", choices=DEEP_MODES)

    def __post_init__(self) -> None:
        from .strategies import check_strategy_name  # nevergrad, only when a config is built

        check_strategy_name(self.optimizer)
        if self.output_noise < 0 or (self.output_decimals is not None and not 0 <= self.output_decimals <= 12):
            raise ValueError(f"need output_noise >= 0 and output_decimals in [0, 12], received {self.output_noise} and "
                             f"{self.output_decimals}")
        for name in ("popsize", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: never), received {self.eval_every}")
        if self.shots < 1 or self.val_shots < 0:
            raise ValueError(f"need shots >= 1 and val_shots >= 0, received {self.shots} and {self.val_shots}")
        for name, allowed in (("variant", tuple(VARIANTS)), ("loss", LOSSES), ("text_context", TEXT_CONTEXTS),
                              ("visual_prompt_position", PLACEMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, received {getattr(self, name)!r}")
        if isinstance(self.depth, int) and not isinstance(self.depth, bool):  # the Python API may pass a number
            object.__setattr__(self, "depth", str(self.depth))
        check_depth(self.depth)
        for name, allowed in (("deep_schedule", SCHEDULES), ("subspace", SUBSPACES), ("deep_prompt_mode", DEEP_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, received {getattr(self, name)!r}")
        if self.subspace == "shared" and 0 in self.dims():
            raise ValueError(f"subspace 'shared' projects one z to both prompts: it needs variant 'joint', received "
                             f"{self.variant!r} (with these dims/n_ctx)")
        if self.depth != "1" and self.visual_prompt_position == "add" and self.dims()[1]:
            raise ValueError("deep visual prompts replace appended tokens; visual_prompt_position 'add' appends none: "
                             "use pre_ln or post_ln with --depth > 1")
        if self.text_context == "mixed" and self.d_text < 2:
            raise ValueError(f"text_context 'mixed' splits d_text between a shared and a per-class part; d_text={self.d_text}")
        from .feedback import check_feedback

        check_feedback(self.feedback)
        if self.template is not None:
            Template(self.template)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, received {self.protocol!r}")
        if self.protocol == "base2new" and self.dims()[0] and self.text_context != "shared":
            raise ValueError(f"protocol 'base2new' tests on classes the run never sees: a {self.text_context!r} text context "
                             "has vectors only for the tuned classes; use text_context 'shared' (--text-context shared)")
        if self.dataset is not None:
            from .datasets.registry import get_dataset

            object.__setattr__(self, "dataset", get_dataset(self.dataset).name)  # one spelling in summaries and keys
        if self.dims() == (0, 0):
            raise ValueError(f"variant {self.variant!r} with these dims/n_ctx leaves nothing to tune")

    def dims(self) -> tuple[int, int]:
        """Effective (d_text, d_vision) after the variant and zero n_ctx switch modalities off."""
        text, vision = VARIANTS[self.variant]
        d_text = self.d_text if text and (self.n_ctx_text is None or self.n_ctx_text > 0) else 0
        d_vision = self.d_vision if vision and (self.n_ctx_vision is None or self.n_ctx_vision > 0) else 0
        return d_text, d_vision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> TuneConfig:
        return replace(self, **changes)


CONFIG_FIELDS = tuple(f.name for f in fields(TuneConfig))

PRESETS: dict[str, dict[str, Any]] = {
    # BPT-VLM as published: CMA-ES, population 30, sigma 1, 8 + 5 tokens, 500 + 500 dimensions, joint,
    # one shared context, prompts before the pre-layer-norm, cross-entropy.
    "paper": {},
    # Best measured on the embedded suite, chosen on seeds 3-5 apart from the reported 0-2
    # (scripts/compare_variants.py; BENCHMARKS.md "Text contexts" and "The default preset's strategy"):
    # DiagonalCMA, text, mixed context.
    # 2,000 queries: the demo's budget, where mixed text pulls ahead (BENCHMARKS.md "Query budgets").
    "default": {"optimizer": "DiagonalCMA", "variant": "text", "text_context": "mixed", "budget": 2000},
}
DEFAULT_PRESET = "default"


def resolve_config(preset: str = DEFAULT_PRESET, /, **overrides: Any) -> TuneConfig:
    """The preset's config with ``overrides`` (``None`` values are ignored: "not given")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], CONFIG_FIELDS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; settings are {', '.join(CONFIG_FIELDS)}"
        raise ValueError(f"unknown setting {unknown[0]!r}{hint}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return TuneConfig(**{**PRESETS[preset], **given})


def field_default(name: str) -> Any:
    """The dataclass default of a field (the paper's)."""
    f = next(f for f in fields(TuneConfig) if f.name == name)
    return None if f.default is MISSING else f.default


@dataclass(frozen=True)
class Template:
    """A hand-written prompt with one ``{}``: ``"a photo of a {}."``.

    With a tuned text context the server gets ``prefix`` as ``context_init`` (its token embeddings
    are added to the context, so z = 0 reproduces the template) and ``class_text(name)`` as the class
    name: the template from ``{}`` on, e.g. ``"dog."``.
    """

    text: str

    def __post_init__(self) -> None:
        if self.text.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}', received {self.text!r}")

    @property
    def prefix(self) -> str:
        return self.text.split("{}", 1)[0].strip()

    def class_text(self, name: str) -> str:
        return name + self.text.split("{}", 1)[1]

    def full(self, name: str) -> str:
        return self.text.replace("{}", name)


def task_template(config: TuneConfig, data: Any) -> Template:
    """The config's template, else the data's own, else ``DEFAULT_TEMPLATE``."""
    return Template(config.template or getattr(data, "template", None) or DEFAULT_TEMPLATE)
