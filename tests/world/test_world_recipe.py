"""A shortened pretraining run (well under 2 minutes on 2 cores) learns an attribute, and saves a
directory that loads the way the server loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from bptvlm.world.evaluate import Normalisation, evaluate
from bptvlm.world.pretrain import ModelConfig, TrainConfig, pretrain, save
from bptvlm.world.tasks import load_task

SHORT = TrainConfig(steps=800, batch_size=64, lr=3e-3, warmup_steps=30,
                    model=ModelConfig(vision_width=64, vision_layers=2, text_width=64, text_layers=1, heads=2,
                                      projection_dim=64))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads thrash on a busy 2-core box (10x slower)
    try:
        model, tokenizer, norm = pretrain(SHORT, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("short") / "model"
    save(out, model, tokenizer, norm, {"test": True})
    return out


def test_short_run_learns_an_attribute(short_run: Path) -> None:
    model = CLIPModel.from_pretrained(short_run)
    tokenizer = AutoTokenizer.from_pretrained(short_run)
    proc = CLIPImageProcessor.from_pretrained(short_run)
    results = evaluate(model, tokenizer, Normalisation(tuple(proc.image_mean), tuple(proc.image_std)),
                       ["colour", "colour_clutter", "background"], probe=False)
    best = max(row["zero_shot"] for row in results.values())
    assert best >= 0.9, results


def test_saved_directory_matches_the_server_contract(short_run: Path) -> None:
    model = CLIPModel.from_pretrained(short_run)
    tokenizer = AutoTokenizer.from_pretrained(short_run)
    proc = CLIPImageProcessor.from_pretrained(short_run)
    text = model.config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert text.eos_token_id != 2 and text.max_position_embeddings >= 32
    images = load_task("shape", shots=2, n_val=0, n_test=1).train_images
    pixels = proc(images=list(images), return_tensors="pt").pixel_values
    expected = Normalisation(tuple(proc.image_mean), tuple(proc.image_std))(images)
    assert torch.allclose(pixels, expected, atol=1e-5)
    assert list((short_run).glob("*.safetensors"))


def test_recipe_is_deterministic() -> None:
    cfg = TrainConfig(steps=3, batch_size=16, model=SHORT.model)
    a, _, _ = pretrain(cfg, seed=5, progress=False)
    b, _, _ = pretrain(cfg, seed=5, progress=False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert np.isfinite(a.logit_scale.item())
