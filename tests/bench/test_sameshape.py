"""The same-shape white-box ceiling: the in-process forwards equal the server's, every prompt form
trains by gradient, the grid makes one ceiling per black-box prompt form and the report divides by it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bptvlm.bench.grid import make_grid
from bptvlm.bench.report import ceiling_table, summarise
from bptvlm.bench.sameshape import PromptShape, SameShape, VisualPrompted, run_same_shape
from bptvlm.client.config import Template
from bptvlm.data import load_data
from bptvlm.launch import local_server

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("placement", ["pre_ln", "post_ln", "add"])
def test_visual_forward_equals_the_servers_prompted_images(tiny_model: object, placement: str) -> None:
    clip = tiny_model
    lim = clip.limits  # type: ignore[attr-defined]
    images = np.random.default_rng(0).integers(0, 256, (3, lim.image_size, lim.image_size, 3), dtype=np.uint8)
    m = (lim.image_size // lim.patch_size) ** 2 + 1 if placement == "add" else 5
    prompt = torch.randn(m, lim.vision_width, generator=GEN) * 0.5
    mine = VisualPrompted(clip, images, placement)  # type: ignore[arg-type]
    with torch.no_grad():
        ours = mine.features(prompt)
    served = clip.encode_images(clip.preprocess(images), prompt.unsqueeze(0), placement)[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(ours, served.float(), atol=1e-5, rtol=1e-4)
    trainable = prompt.clone().requires_grad_(True)
    mine.features(trainable).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0  # the gradient reaches the prompt


def _task(clip: object, shots: int = 4) -> object:
    lim = clip.limits  # type: ignore[attr-defined]
    return load_data("shape", seed=0, shots=shots, val_shots=2, test_per_class=4, image_size=lim.image_size)


@pytest.mark.parametrize("form", ["per_class", "mixed"])
def test_class_specific_text_equals_the_servers(tiny_model: object, form: str) -> None:
    clip, template = tiny_model, Template("a photo of a {}.")
    data = _task(clip)
    model = SameShape(clip, data, template, PromptShape("text", form, n_ctx_text=8))  # type: ignore[arg-type]
    c = len(data.class_names)  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in model.params.values():
            p.copy_(torch.randn(p.shape, generator=GEN) * 0.05)
        ours = model.text_features(model.params)
    ctx = model.params["per_class"] + (model.params["shared"].unsqueeze(0) if form == "mixed" else 0)  # [C, n, D]
    init = clip.context_init(template.prefix, 8)  # type: ignore[attr-defined]
    texts = [template.class_text(n) for n in data.class_names]  # type: ignore[attr-defined]
    served = clip.encode_text(clip.tokenize(texts), (init + ctx.detach()).unsqueeze(0))[0]  # type: ignore[attr-defined]
    assert ours.shape[0] == c
    torch.testing.assert_close(ours, served.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("variant", "form", "trained"), [
    ("text", "shared", ["shared"]), ("text", "per_class", ["per_class"]), ("text", "mixed", ["per_class", "shared"]),
    ("vision", "shared", ["visual"]), ("joint", "mixed", ["per_class", "shared", "visual"]),
])
def test_every_form_trains_to_a_lower_training_loss(tiny_model: object, variant: str, form: str, trained: list[str]) -> None:
    # the paper's prompt lengths: 8 text context vectors, 5 visual tokens appended before the pre-LayerNorm
    clip, template = tiny_model, Template("a photo of a {}.")
    data = _task(clip)
    shape = PromptShape(variant, form, n_ctx_text=8, n_ctx_vision=5)
    result = run_same_shape(clip, data, template, shape, steps=30, lr=0.05, seed=0)  # type: ignore[arg-type]
    assert result["trained"] == trained
    assert {"val_accuracy", "test_accuracy", "train_accuracy", "selected"} <= set(result)
    model = SameShape(clip, data, template, shape)  # type: ignore[arg-type]
    labels = torch.as_tensor(np.asarray(data.train_labels))  # type: ignore[attr-defined]
    scale = clip.model.logit_scale.exp()  # type: ignore[attr-defined]

    @torch.no_grad()
    def train_loss(params: dict[str, torch.Tensor]) -> float:
        logits = scale * model.image_features("train", params) @ model.text_features(params).T
        return float(torch.nn.functional.cross_entropy(logits, labels))

    start = train_loss(model.params)
    opt = torch.optim.AdamW(list(model.params.values()), lr=0.05)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(scale * model.image_features("train", model.params)
                                                 @ model.text_features(model.params).T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert train_loss(model.params) < start  # the gradient path reaches every trained tensor


def test_grid_makes_one_ceiling_per_prompt_form() -> None:
    grid = make_grid({"tasks": "shape", "preset": "paper", "optimizers": "CMA,DiagonalCMA", "variants": "text,joint",
                      "n_ctx_text": "4,8", "seeds": "0,1", "baselines": "same-shape", "text_context": "mixed"})
    cells = grid.baseline_cells(whitebox=True)
    assert {(c.variant, c.n_ctx_text, c.n_ctx_vision) for c in cells} == {("text", 4, 0), ("text", 8, 0), ("joint", 4, 0), ("joint", 8, 0)}
    assert len(cells) == 4 * 2 and not grid.baseline_cells(whitebox=False)  # per seed; in-process only
    shared = make_grid({**{"tasks": "shape", "preset": "paper", "variants": "text", "baselines": "same-shape"}})
    one_mixed = next(c for c in cells if c.variant == "text" and c.n_ctx_text == 8 and c.seed == 0)
    one_shared = next(c for c in shared.baseline_cells(whitebox=True) if c.seed == 0)
    assert one_mixed.key(grid, "m") != one_shared.key(shared, "m")  # the text-context form shapes the result


def _row(task: str, kind: str, method: str, variant: str, budget: int, acc: float, seed: int = 0) -> dict[str, object]:
    return {"task": task, "kind": kind, "optimizer": method, "variant": variant, "d": 500 if kind == "blackbox" else 0,
            "n_ctx_text": 0, "n_ctx_vision": 0, "budget": budget, "test_accuracy": acc, "seed": seed}


def test_report_divides_each_black_box_column_by_its_ceiling() -> None:
    rows = [_row("a", "blackbox", "CMA", "text", 100, 0.4), _row("a", "blackbox", "CMA", "text", 100, 0.6, seed=1),
            _row("a", "white-box", "same-shape", "text", 0, 0.8),
            _row("b", "blackbox", "CMA", "text", 100, 0.3), _row("b", "white-box", "same-shape", "text", 0, 0.6),
            _row("a", "blackbox", "CMA", "joint", 100, 0.5)]  # no joint ceiling: no joint row
    table = ceiling_table(summarise(rows), [100], set())
    # task a: mean 0.5 / 0.8 = 0.625; task b: 0.3 / 0.6 = 0.5; mean 0.5625
    assert "| CMA text | 0.56 |" in table and "joint" not in table


@pytest.mark.slow
def test_bench_runs_the_ceiling_beside_the_paper_shaped_black_box(tmp_path: Path) -> None:
    # the paper's prompt form (joint: 8 text context vectors, 5 visual tokens), d = 500 each, popsize 30, shallow and deep
    out = tmp_path / "run"
    with local_server("tiny-random", timeout=120) as url:
        cmd = [sys.executable, "-m", "bptvlm.bench", "--endpoint", url, "--tasks", "shape", "--preset", "paper",
               "--budgets", "60", "--variants", "joint", "--depths", "1,all", "--baselines", "same-shape",
               "--whitebox-model", "tiny-random",
               "--coop-steps", "20", "--shots", "2", "--val-shots", "2", "--test-per-class", "3", "--out", str(out),
               "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "same shape joint (white-box)" in report
    assert "## Black-box as a fraction of its same-shape white-box ceiling" in report
    fractions = report.split("same-shape white-box ceiling")[-1]
    assert "| CMA joint | " in fractions and "| CMA joint deep=all cycle | " in fractions  # shallow and deep, each its own
    assert "same shape joint deep=all (white-box)" in report


@pytest.mark.parametrize("placement", ["pre_ln", "post_ln"])
def test_deep_forwards_equal_the_servers_deep_prompts(placement: str) -> None:
    # 3 layers a tower: deep prompts at the input of layers 1 and 2, text (per-class context) and vision
    from bptvlm.server.loading import tiny_random_clip
    from bptvlm.server.model import PromptedCLIP

    clip, template = PromptedCLIP(tiny_random_clip(seed=0, layers=3)), Template("a photo of a {}.")
    data = _task(clip)
    shape = PromptShape("joint", "per_class", n_ctx_text=4, n_ctx_vision=5, placement=placement, depths=(3, 3))
    model = SameShape(clip, data, template, shape)  # type: ignore[arg-type]
    assert {k: tuple(v.shape) for k, v in model.params.items() if "deep" in k} == {
        "text_deep": (2, 4, clip.limits.text_width), "visual_deep": (2, 5, clip.limits.vision_width)}
    with torch.no_grad():
        for p in model.params.values():
            p.copy_(torch.randn(p.shape, generator=GEN) * 0.3)
        ours_text, ours_images = model.text_features(model.params), model.image_features("train", model.params)
    prm = model.params
    init = clip.context_init(template.prefix, 4)
    texts = [template.class_text(n) for n in data.class_names]  # type: ignore[attr-defined]
    served_text = clip.encode_text(clip.tokenize(texts), (init + prm["per_class"]).unsqueeze(0),
                                   deep=prm["text_deep"].unsqueeze(0))[0]
    served_images = clip.encode_images(clip.preprocess(data.train_images), prm["visual"].unsqueeze(0), placement,  # type: ignore[attr-defined]
                                       deep=prm["visual_deep"].unsqueeze(0))[0]
    torch.testing.assert_close(ours_text, served_text.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_images, served_images.float(), atol=1e-5, rtol=1e-4)
    shallow = SameShape(clip, data, template, PromptShape("joint", "per_class", 4, 5, placement))  # type: ignore[arg-type]
    with torch.no_grad():
        assert not torch.allclose(shallow.image_features("train", {"visual": prm["visual"]}), ours_images)  # deep counts
    result = run_same_shape(clip, data, template, shape, steps=10, lr=0.05, seed=0)  # type: ignore[arg-type]
    assert result["trained"] == ["per_class", "text_deep", "visual", "visual_deep"]


def test_deep_black_box_cells_share_one_ceiling_per_depth() -> None:
    from bptvlm.bench.report import ceiling_of, prompt_form

    grid = make_grid({"tasks": "shape", "preset": "paper", "variants": "joint", "depths": "1,all",
                      "deep_schedules": "cycle,joint", "subspaces": "separate,shared", "baselines": "same-shape"})
    ceilings = grid.baseline_cells(whitebox=True)
    assert sorted(c.depth for c in ceilings) == ["1", "all"]  # not one per schedule or subspace
    assert prompt_form("joint deep=all joint shared") == prompt_form("joint deep=all cycle") == "joint deep=all"
    assert ceiling_of(("t", "blackbox", "CMA", "joint deep=all joint shared", 500, 0, 0))[3] == "joint deep=all"
    assert prompt_form("joint shared") == "joint"
