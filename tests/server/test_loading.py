"""The real-user path: a CLIP saved with save_pretrained is served exactly as it was saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bptvlm.server.loading import load_model, tiny_random_clip
from bptvlm.server.model import PromptedCLIP


def test_local_directory_roundtrip(tmp_path: Path) -> None:
    original = tiny_random_clip(seed=3)
    for part in (original.model, original.tokenizer, original.image_processor):
        part.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    a, b = PromptedCLIP(original), PromptedCLIP(loaded)
    assert a.limits == b.limits
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(b.preprocess(images), a.preprocess(images))
    ctx = torch.randn(2, 4, a.limits.text_width) * 0.02
    names = ["dog.", "seven."]
    torch.testing.assert_close(b.encode_text(b.tokenize(names), ctx), a.encode_text(a.tokenize(names), ctx))
    torch.testing.assert_close(b.encode_images(b.preprocess(images)), a.encode_images(a.preprocess(images)))


def test_seeds_give_different_models() -> None:
    a, b = tiny_random_clip(0).model, tiny_random_clip(1).model
    assert not torch.equal(a.logit_scale + a.text_projection.weight.sum(), b.logit_scale + b.text_projection.weight.sum())


def test_directory_without_a_model_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))


def test_tiny_tokenizer_is_the_same_in_every_process() -> None:
    import subprocess
    import sys

    code = ("from bptvlm.server.loading import tiny_random_clip; "
            "print(tiny_random_clip(0).tokenizer('a photo of a red zebra.').input_ids)")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1
