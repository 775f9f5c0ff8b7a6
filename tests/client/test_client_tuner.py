"""The ask/tell loop against the fake server: exact budget, one request per generation, outputs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bptvlm.client.api import ClipClient
from bptvlm.client.artifacts import load_prompts
from bptvlm.client.data import FewShotData
from bptvlm.client import projection
from bptvlm.client.config import Template, TuneConfig
from bptvlm.client.evaluate import evaluate_saved
from bptvlm.client.run import run_tuning
from bptvlm.client.strategies import StrategySpec, check_strategy_name, make_strategy
from bptvlm.shared import protocol as p

from .conftest import LIMITS, FakeServer, read_jsonl

SMALL = {"d_text": 8, "d_vision": 6, "n_ctx_text": 2, "n_ctx_vision": 2}


def _data(n_train: int = 6, n_test: int = 4, val: bool = False) -> FewShotData:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 2

    train, test = split(n_train), split(n_test)
    vi, vl = split(4) if val else (None, None)
    return FewShotData(["cat", "dog"], *train, *test, val_images=vi, val_labels=vl)


@pytest.mark.parametrize(("budget", "popsize", "optimizer"), [(47, 10, "CMA"), (40, 10, "CMA"), (3, 10, "CMA"), (1, 1, "OnePlusOne")],
                         ids=["ragged", "even", "under-one-gen", "one"])
def test_exact_budget_one_request_per_generation(
    client: ClipClient, fake_server: FakeServer, tmp_path: Path, budget: int, popsize: int, optimizer: str
) -> None:
    config = TuneConfig(budget=budget, popsize=popsize, optimizer=optimizer, **SMALL)
    summary = run_tuning(client, _data(), config, tmp_path, progress=False)
    assert summary["train_queries"] == budget
    generations = math.ceil(budget / popsize)
    progress = read_jsonl(tmp_path / "progress.jsonl")
    assert [r["generation"] for r in progress] == list(range(generations))
    assert progress[-1]["queries"] == budget
    sizes = [arrays[p.TEXT_CONTEXT].shape[0] if p.TEXT_CONTEXT in arrays else 1 for _, arrays in fake_server.infer_bodies]
    # initial loss (1) + one request per generation + evaluation
    train_sizes = sizes[1 : 1 + generations]
    assert sum(train_sizes) == budget and all(s == popsize for s in train_sizes[:-1])
    assert fake_server.candidates == summary["train_queries"] + summary["eval_queries"]
    assert summary["server_usage"]["candidates"] == fake_server.candidates


def test_loss_goes_down_and_outputs_are_written(client: ClipClient, tmp_path: Path) -> None:
    config = TuneConfig(budget=300, popsize=10, optimizer="DiagonalCMA", **SMALL)
    summary = run_tuning(client, _data(), config, tmp_path, progress=False)
    assert summary["best_train_loss"] < summary["initial_train_loss"]
    required = {"zero_shot_accuracy", "test_accuracy", "initial_train_loss", "best_train_loss", "train_queries",
                "eval_queries", "optimizer", "budget", "seed", "model", "variant", "popsize", "wall_s", "server_usage"}
    assert required <= set(summary)
    assert json.loads((tmp_path / "summary.json").read_text())["best_train_loss"] == pytest.approx(summary["best_train_loss"])
    assert summary["model"] == "fake-clip" and summary["optimizer"] == "DiagonalCMA"
    assert summary["zero_shot_accuracy"] == 0.0 and summary["test_accuracy"] == 1.0  # fake logits: see conftest
    progress = read_jsonl(tmp_path / "progress.jsonl")
    assert set(progress[0]) >= {"generation", "queries", "best_loss", "mean_loss", "wall_s"}
    best = [r["best_loss"] for r in progress]
    assert best == sorted(best, reverse=True)
    saved = load_prompts(tmp_path / "prompts.safetensors")
    assert saved.tensors[p.TEXT_CONTEXT].shape == (1, 2, LIMITS.text_width)
    assert saved.tensors[p.VISUAL_PROMPT].shape == (1, 2, LIMITS.vision_width)
    assert saved.meta["class_names"] == ["cat", "dog"] and saved.meta["template"] == "a photo of a {}."
    assert saved.meta["seed"] == 0 and saved.meta["n_ctx_text"] == 2 and saved.meta["model"] == "fake-clip"


def test_requests_carry_the_template_split(client: ClipClient, fake_server: FakeServer, tmp_path: Path) -> None:
    run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, **SMALL), tmp_path, progress=False)
    (first_req, first), *_, (last_req, last) = fake_server.infer_bodies
    assert first[p.CLASS_NAMES].tolist() == [b"cat.", b"dog."]
    assert first_req.parameters == {"loss": "ce", "context_init": "a photo of a", "visual_prompt_position": "pre_ln"}
    # the last request is zero-shot: no prompts, the full hand-written template, logits only
    assert p.TEXT_CONTEXT not in last and last[p.CLASS_NAMES].tolist() == [b"a photo of a cat.", b"a photo of a dog."]
    assert last_req.parameters == {"loss": "ce"} and [o.name for o in last_req.outputs or []] == ["logits"]
    assert len(fake_server.batches) == 2  # train and test uploaded once each


@pytest.mark.parametrize(
    ("variant", "keys", "dim"),
    [("text", {p.TEXT_CONTEXT}, 8), ("vision", {p.VISUAL_PROMPT}, 6), ("joint", {p.TEXT_CONTEXT, p.VISUAL_PROMPT}, 14)],
    ids=["text", "vision", "joint"],
)
def test_variants_send_only_their_prompts(
    client: ClipClient, fake_server: FakeServer, tmp_path: Path, variant: str, keys: set[str], dim: int
) -> None:
    config = TuneConfig(budget=10, popsize=5, variant=variant, **SMALL)
    summary = run_tuning(client, _data(), config, tmp_path, progress=False)
    _, arrays = fake_server.infer_bodies[1]
    assert keys == set(arrays) & {p.TEXT_CONTEXT, p.VISUAL_PROMPT}
    assert summary["d_text"] + summary["d_vision"] == dim
    if variant == "vision":  # no text context: class names are the whole template
        assert arrays[p.CLASS_NAMES].tolist() == [b"a photo of a cat.", b"a photo of a dog."]


def test_same_seed_same_run_other_seed_other_run(make_client: Callable[..., ClipClient], tmp_path: Path) -> None:
    def run(seed: int, name: str) -> dict:
        config = TuneConfig(budget=40, popsize=10, seed=seed, **SMALL)
        return run_tuning(make_client(), _data(), config, tmp_path / name, progress=False)

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert a["best_train_loss"] == b["best_train_loss"] != c["best_train_loss"]
    assert (tmp_path / "a" / "progress.jsonl").read_text().count("best_loss") == 4


def test_validation_split_selects_by_val_accuracy(client: ClipClient, tmp_path: Path) -> None:
    summary = run_tuning(client, _data(val=True), TuneConfig(budget=30, popsize=10, optimizer="TBPSA", **SMALL), tmp_path, progress=False)
    assert summary["selected_by"] == "val_accuracy" and summary["num_val"] == 4
    assert summary["selected"] in ("best", "recommendation", "template")
    assert "val_loss_best" in summary and "val_loss_template" in summary and "test_accuracy_recommendation" in summary


def test_template_wins_when_tuning_only_fits_the_training_shots(
    client: ClipClient, fake_server: FakeServer, tmp_path: Path
) -> None:
    """On validation images the fake scores the unprompted template right and every prompt wrong:
    the run must fall back to the template, and its saved file must apply no prompt."""
    data = _data(val=True)
    fake_server.template_wins_on.add(client.upload_images(data.val_images))
    summary = run_tuning(client, data, TuneConfig(budget=60, popsize=10, variant="text", **SMALL), tmp_path, progress=False)
    assert summary["best_train_loss"] < summary["initial_train_loss"]
    assert summary["val_accuracy_template"] == 1.0 > summary["val_accuracy_best"]
    assert summary["selected"] == "template"
    assert summary["test_accuracy"] == summary["zero_shot_accuracy"] == summary["test_accuracy_template"]
    saved = load_prompts(tmp_path / "prompts.safetensors")
    assert saved.prompts() == {} and saved.meta["selected"] == "template"


def test_forgotten_image_batch_is_uploaded_again(client: ClipClient, fake_server: FakeServer, tmp_path: Path) -> None:
    data = _data()
    client.upload_images(data.train_images)
    fake_server.batches.clear()  # the server restarted
    summary = run_tuning(client, data, TuneConfig(budget=10, popsize=10, **SMALL), tmp_path, progress=False)
    assert summary["train_queries"] == 10


def test_evaluate_saved(client: ClipClient, tmp_path: Path) -> None:
    run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, **SMALL), tmp_path, progress=False)
    result = evaluate_saved(client, tmp_path / "prompts.safetensors", _data(n_test=6))
    assert result["test_accuracy"] == 1.0 and result["zero_shot_accuracy"] == 0.0
    assert result["eval_queries"] == 2 and result["num_test"] == 6


def test_per_class_prompts_refuse_other_classes_prompts_without_them_do_not(client: ClipClient, tmp_path: Path) -> None:
    renamed = _data(n_test=6)
    renamed.class_names = ["lion", "wolf"]
    run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, variant="text", text_context="per_class", **SMALL),
               tmp_path / "text", progress=False)
    assert load_prompts(tmp_path / "text" / "prompts.safetensors").tensors[p.TEXT_CONTEXT].shape == (1, 2, 2, LIMITS.text_width)
    with pytest.raises(ValueError, match="one text context per class of its run's 2 classes"):
        evaluate_saved(client, tmp_path / "text" / "prompts.safetensors", renamed)
    run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, variant="vision", text_context="mixed", **SMALL),
               tmp_path / "vision", progress=False)  # no text context in the file: any classes will do
    assert evaluate_saved(client, tmp_path / "vision" / "prompts.safetensors", renamed)["num_test"] == 6


def test_per_class_projection_too_large_is_refused(client: ClipClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projection, "MAX_TEXT_PROJECTION_BYTES", 8 * 2 * 2 * LIMITS.text_width * 4 - 1)
    with pytest.raises(ValueError, match="with 2 classes needs a 0.0 GiB projection"):
        run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, text_context="per_class", **SMALL), tmp_path, progress=False)
    run_tuning(client, _data(), TuneConfig(budget=10, popsize=10, **SMALL), tmp_path, progress=False)  # shared: 1 block


def test_template_split() -> None:
    t = Template("a photo of a {}.")
    assert (t.prefix, t.class_text("dog"), t.full("dog")) == ("a photo of a", "dog.", "a photo of a dog.")
    mid = Template("a photo of a {}, a type of pet.")
    assert (mid.prefix, mid.class_text("pug")) == ("a photo of a", "pug, a type of pet.")
    start = Template("{} in the wild.")
    assert (start.prefix, start.class_text("owl")) == ("", "owl in the wild.")
    with pytest.raises(ValueError, match="exactly one"):
        Template("no placeholder")


def test_configurable_popsize_is_the_request_size() -> None:
    strategy = make_strategy(StrategySpec("DiagonalCMA", popsize=5, dimension=50, budget=100, seed=0))
    assert strategy.population == 5  # nevergrad's default would be max(5, 4 + 3 ln 50) = 15


def test_unknown_optimizer_lists_close_names() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'DiagonalCMAA'; did you mean .*DiagonalCMA"):
        check_strategy_name("DiagonalCMAA")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"popsize": 0}, "popsize"),
        ({"variant": "deep"}, "variant"),
        ({"loss": "mse"}, "loss"),
        ({"visual_prompt_position": "mid"}, "visual_prompt_position"),
        ({"variant": "text", "d_text": 0}, "nothing to tune"),
        ({"template": "a {} and a {}"}, "exactly one"),
        ({"text_context": "per-class"}, "text_context must be one of"),
        ({"text_context": "mixed", "d_text": 1}, "splits d_text"),
    ],
    ids=["budget", "popsize", "variant", "loss", "placement", "nothing", "template", "text-context", "mixed-d1"],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TuneConfig(**kwargs)  # type: ignore[arg-type]
