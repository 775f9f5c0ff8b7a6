"""`bptvlm serve --compile`: torch.compile'd encoders give the uncompiled results (within 1e-5), off by default."""

from __future__ import annotations

import pytest
import torch

from bptvlm.cli import build_parser
from bptvlm.server import app as app_module
from bptvlm.server.config import Settings
from bptvlm.server.loading import tiny_random_clip
from bptvlm.server.model import PromptedCLIP

TOLERANCE = 1e-5  # on unit-norm features; float32 rounding measured ~2e-7


@pytest.mark.slow  # the first compiled forward takes ~20 s on one busy CPU core
def test_compiled_encoders_equal_eager() -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    eager, compiled = PromptedCLIP(tiny_random_clip(0)), PromptedCLIP(tiny_random_clip(0))
    app_module.compile_encoders(compiled)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32, generator=gen)
    positions = eager.limits.image_size // eager.limits.patch_size
    prompts = {"pre_ln": torch.randn(3, 2, 32, generator=gen), "add": torch.randn(3, positions**2 + 1, 32, generator=gen) * 0.1}
    context = torch.randn(3, 4, 32, generator=gen) * 0.02
    texts = eager.tokenize(["cat.", "a red circle", "dog"])
    for population in (3, 2):  # a second shape: dynamic, not a recompile per population
        for placement, prompt in prompts.items():
            a = eager.encode_images(pixels, prompt[:population], placement=placement)
            b = compiled.encode_images(pixels, prompt[:population], placement=placement)
            torch.testing.assert_close(b, a, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(compiled.encode_text(texts, context[:population]),
                                   eager.encode_text(texts, context[:population]), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(compiled.encode_images(pixels), eager.encode_images(pixels), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(compiled.encode_text(texts), eager.encode_text(texts), atol=TOLERANCE, rtol=0)
    assert counters["stats"]["unique_graphs"] >= 2  # both encoders ran compiled, not a silent eager fallback


@pytest.mark.parametrize("flag", [False, True])
def test_build_service_compiles_only_when_asked(flag: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[PromptedCLIP] = []
    monkeypatch.setattr(app_module, "compile_encoders", calls.append)
    app_module.build_service(Settings(model="tiny-random", device="cpu", compile=flag))
    assert len(calls) == int(flag)


def test_serve_flag_defaults_off() -> None:
    assert build_parser().parse_args(["serve"]).compile is False
    assert build_parser().parse_args(["serve", "--compile"]).compile is True
    assert Settings().compile is False
