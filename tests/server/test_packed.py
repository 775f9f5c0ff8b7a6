"""The CPU form of the encoders (server/packed.py) computes what the library's modules compute.

Packed and unpacked copies of one model score the same prompts: float32 features agree to 1e-5, bfloat16
to a cosine of 0.999; gradients (the white-box path) agree in float32; every activation the packing
treats differently (quick_gelu folded into SiLU, gelu fused, any other kept apart) is covered; and the
served ViT-B/32 shape at the paper's population agrees too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from bptvlm.server import app as app_module
from bptvlm.server import model as model_module
from bptvlm.server import packed
from bptvlm.server.app import build_service
from bptvlm.server.config import Settings
from bptvlm.server.deep import text_hidden
from bptvlm.server.loading import LoadedModel, random_vit_b32, tiny_random_clip
from bptvlm.server.model import PromptedCLIP

pytestmark = pytest.mark.skipif(not packed.packing_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


def _with_activation(loaded: LoadedModel, act: str) -> LoadedModel:
    """``loaded`` with ``act`` in every MLP, and random biases (the tiny model starts with zeros, which
    would hide a bias the packing scaled wrongly)."""
    gen = torch.Generator().manual_seed(4)
    for module in loaded.model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data = torch.randn(module.bias.shape, generator=gen) * 0.5
    for tower in (loaded.model.text_model, loaded.model.vision_model):
        tower.config.hidden_act = act
        for layer in tower.encoder.layers:
            layer.mlp.activation_fn = ACT2FN[act]
    return loaded


def _pair(loaded: LoadedModel, dtype: torch.dtype) -> tuple[PromptedCLIP, PromptedCLIP]:
    return (PromptedCLIP(copy.deepcopy(loaded), dtype=dtype, pack=False),
            PromptedCLIP(copy.deepcopy(loaded), dtype=dtype, pack=True))


def _features(model: PromptedCLIP, population: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    lim, gen = model.limits, torch.Generator().manual_seed(1)
    pixels = torch.randn(images, lim.num_channels, lim.image_size, lim.image_size, generator=gen)
    visual = torch.randn(population, 5, lim.vision_width, generator=gen) * 0.05
    ctx = torch.randn(population, 4, lim.text_width, generator=gen) * lim.token_embedding_std
    tokens = model.tokenize(["a photo of a cat.", "a dog", "the red square on a mat"])
    return (model.encode_images(pixels.to(model.dtype), visual).float(),
            model.encode_text(tokens, ctx).float())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "relu"])
def test_packed_float32_equals_the_library_modules(act: str) -> None:
    plain, fast = _pair(_with_activation(tiny_random_clip(seed=3), act), torch.float32)
    for a, b in zip(_features(plain, 6, 5), _features(fast, 6, 5)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_packed_bfloat16_agrees_with_the_library_modules(act: str) -> None:
    if not packed.packing_available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no oneDNN bf16 kernel on this CPU")
    plain, fast = _pair(_with_activation(tiny_random_clip(seed=3), act), torch.bfloat16)
    for a, b in zip(_features(plain, 6, 5), _features(fast, 6, 5)):
        assert _cosine(a, b) >= 0.999


def test_every_encoder_linear_is_packed_and_pack_false_keeps_them() -> None:
    plain, fast = _pair(tiny_random_clip(seed=0, layers=2), torch.float32)
    assert fast.packed and not plain.packed
    for tower in (fast.model.text_model, fast.model.vision_model):
        for layer in tower.encoder.layers:
            assert not any(isinstance(m, nn.Linear) for m in layer.modules())
            assert layer.mlp.fc1.post == "swish" and isinstance(layer.mlp.activation_fn, nn.Identity)
    assert sum(isinstance(m, packed.PackedLinear) for m in fast.model.modules()) == 6 * 2 * 2
    assert not any(isinstance(m, packed.PackedLinear) for m in plain.model.modules())
    # the published statistics come from the original weights, packed or not
    assert fast.limits == plain.limits


def test_gradients_through_packed_layers_equal_the_library_modules() -> None:
    plain, fast = _pair(tiny_random_clip(seed=2), torch.float32)
    grads = []
    for model in (plain, fast):
        text = model.model.text_model
        ids = torch.tensor([[1, 5, 9, 2]]) % text.config.vocab_size
        embeds = text.embeddings.token_embedding(ids).detach().requires_grad_(True)
        text_hidden(text, embeds).square().sum().backward()
        grads.append(embeds.grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_unknown_post_op_is_refused() -> None:
    with pytest.raises(ValueError, match="post-op must be one of"):
        packed.PackedLinear(torch.zeros(2, 3), None, "tanh")


def test_the_server_packs_on_cpu_unless_told_not_to_or_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    on = build_service(Settings(model="tiny-random", device="cpu", dtype="float32"))
    off = build_service(Settings(model="tiny-random", device="cpu", dtype="float32", pack_linears=False))
    monkeypatch.setattr(app_module, "compile_encoders", lambda model: None)  # the choice, not the compile
    compiled = build_service(Settings(model="tiny-random", device="cpu", dtype="float32", compile=True))
    assert on.model.packed and not off.model.packed and not compiled.model.packed


def test_packing_asked_for_where_there_is_no_kernel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "packing_available", lambda device, dtype: False)
    with pytest.raises(ValueError, match="no packed oneDNN linear"):
        PromptedCLIP(tiny_random_clip(seed=0), pack=True)
    assert not PromptedCLIP(tiny_random_clip(seed=0)).packed


@pytest.mark.slow
def test_vit_b32_shape_at_the_paper_population_agrees() -> None:
    """The served shape (ViT-B/32 widths, 12 + 12 layers) in the served dtype, 30 candidates: packed and
    unpacked features agree, and so does each candidate's ranking of the classes."""
    dtype = torch.bfloat16 if packed.packing_available(torch.device("cpu"), torch.bfloat16) else torch.float32
    plain, fast = _pair(random_vit_b32(0), dtype)
    (img_a, txt_a), (img_b, txt_b) = _features(plain, 30, 2), _features(fast, 30, 2)
    assert _cosine(img_a, img_b) >= 0.999 and _cosine(txt_a, txt_b) >= 0.999
    logits_a, logits_b = plain.logits(img_a, txt_a), fast.logits(img_b, txt_b)
    assert (logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean() >= 0.9
