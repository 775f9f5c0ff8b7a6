"""Deep prompts: per-layer replacement is exact where it should change nothing, and local where it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask

from bptvlm.server import deep as layers
from bptvlm.server.loading import tiny_random_clip
from bptvlm.server.model import PromptedCLIP

CLASSES = ["dog.", "red circle.", "seven.", "a large blue square."]
DEPTH = 4  # layers per tower: deep prompts for layers 1..3


@pytest.fixture(scope="module")
def model() -> PromptedCLIP:
    return PromptedCLIP(tiny_random_clip(seed=1, layers=DEPTH))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(model: PromptedCLIP, n: int = 3) -> torch.Tensor:
    return model.preprocess(np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def _text_embeds(model: PromptedCLIP, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings [C, L, D] with the shared context ``ctx [n, D]`` after BOS, and EOS positions."""
    ids, eos_at = model._assemble_ids(model.tokenize(CLASSES), ctx.shape[0])
    embeds = model._text.embeddings.token_embedding(ids).clone()
    embeds[:, 1 : 1 + ctx.shape[0]] = ctx
    return embeds, eos_at


def _vision_tokens(model: PromptedCLIP, pixels: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """pre-LN tokens [N, T + m, D] with ``prompt [m, D]`` appended (the pre_ln placement)."""
    tokens = model._vision.embeddings(pixels)
    return model._vision.pre_layrnorm(torch.cat([tokens, prompt.expand(tokens.shape[0], -1, -1)], dim=1))


def test_without_deep_prompt_the_layer_loop_is_the_library_encoder_bit_for_bit(model: PromptedCLIP) -> None:
    ctx = torch.randn(3, 32, generator=_gen()) * 0.02
    embeds, _ = _text_embeds(model, ctx)
    x = embeds + model._text.embeddings.position_embedding(model._text.embeddings.position_ids[:, : embeds.shape[1]])
    mask = create_causal_mask(config=model._text.config, inputs_embeds=x, attention_mask=None, cache=None)
    with torch.inference_mode():
        ours = layers.text_hidden(model._text, embeds, capture=[])  # capturing: the layer loop, not the module
        library = model._text.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        tokens = _vision_tokens(model, _pixels(model), torch.randn(2, 32, generator=_gen(1)))
        ours_v = layers.vision_hidden(model._vision, tokens, capture=[])
        library_v = model._vision.encoder(inputs_embeds=tokens).last_hidden_state
    assert torch.equal(ours, library) and torch.equal(ours_v, library_v)


def test_text_deep_prompt_equal_to_the_replaced_states_changes_no_feature(model: PromptedCLIP) -> None:
    ctx = torch.randn(3, 32, generator=_gen()) * 0.02
    embeds, _ = _text_embeds(model, ctx)
    capture: list[torch.Tensor] = []
    with torch.inference_mode():
        layers.text_hidden(model._text, embeds, capture=capture)
    # causal: the context positions see only BOS and the context, so every class has the same states there
    torch.testing.assert_close(capture[2][0, 1:4], capture[2][-1, 1:4], atol=1e-6, rtol=0)
    deep = torch.stack([capture[i][0, 1:4] for i in range(1, DEPTH)]).unsqueeze(0)  # [1, 3, n, D]
    batch = model.tokenize(CLASSES)
    shallow = model.encode_text(batch, ctx.unsqueeze(0))
    torch.testing.assert_close(model.encode_text(batch, ctx.unsqueeze(0), deep=deep), shallow, atol=1e-5, rtol=0)
    for depth in (1, 2):  # fewer layers: the first ones
        torch.testing.assert_close(model.encode_text(batch, ctx.unsqueeze(0), deep=deep[:, :depth]), shallow, atol=1e-5, rtol=0)
    noise = torch.randn(deep.shape, generator=_gen(9)) * 10
    assert not torch.allclose(model.encode_text(batch, ctx.unsqueeze(0), deep=deep + noise), shallow, atol=1e-3)


@pytest.mark.parametrize("placement", ["pre_ln", "post_ln"])
def test_visual_deep_prompt_equal_to_the_replaced_states_changes_no_feature(model: PromptedCLIP, placement: str) -> None:
    pixels = _pixels(model, 1)  # the prompt tokens' states depend on the image: one image
    prompt = torch.randn(1, 2, 32, generator=_gen(1))
    if placement == "pre_ln":
        tokens = _vision_tokens(model, pixels, prompt[0])
    else:
        tokens = torch.cat([model._vision.pre_layrnorm(model._vision.embeddings(pixels)), prompt], dim=1)
    capture: list[torch.Tensor] = []
    with torch.inference_mode():
        layers.vision_hidden(model._vision, tokens, capture=capture)
    deep = torch.stack([capture[i][0, -2:] for i in range(1, DEPTH)]).unsqueeze(0)  # [1, 3, m, D]
    shallow = model.encode_images(pixels, prompt, placement)
    torch.testing.assert_close(model.encode_images(pixels, prompt, placement, deep=deep), shallow, atol=1e-5, rtol=0)
    noise = torch.randn(deep.shape, generator=_gen(9)) * 10
    assert not torch.allclose(model.encode_images(pixels, prompt, placement, deep=deep + noise), shallow, atol=1e-3)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_layer_l_prompt_changes_nothing_before_layer_l(model: PromptedCLIP, layer: int) -> None:
    ctx = torch.randn(3, 32, generator=_gen()) * 0.02
    embeds, _ = _text_embeds(model, ctx)
    tokens = _vision_tokens(model, _pixels(model), torch.randn(2, 32, generator=_gen(1)))
    base_t, base_v = torch.randn(len(CLASSES), 3, 3, 32, generator=_gen(2)), torch.randn(3, 3, 2, 32, generator=_gen(3))
    other_t, other_v = base_t.clone(), base_v.clone()
    other_t[:, layer - 1] += 1.0
    other_v[:, layer - 1] += 1.0
    runs = []
    with torch.inference_mode():
        for dt, dv in ((base_t, base_v), (other_t, other_v)):
            ct: list[torch.Tensor] = []
            cv: list[torch.Tensor] = []
            layers.text_hidden(model._text, embeds, deep=dt, capture=ct)
            layers.vision_hidden(model._vision, tokens, deep=dv, capture=cv)
            runs.append((ct, cv))
    for tower in (0, 1):
        a, b = runs[0][tower], runs[1][tower]
        for i in range(layer):  # inputs of layers 0 .. l-1 are the same, bit for bit
            assert torch.equal(a[i], b[i]), (tower, i)
        prompt_at = slice(1, 4) if tower == 0 else slice(-2, None)
        assert not torch.equal(a[layer][:, prompt_at], b[layer][:, prompt_at])
        rest = (torch.cat([a[layer][:, :1], a[layer][:, 4:]], 1), torch.cat([b[layer][:, :1], b[layer][:, 4:]], 1)) \
            if tower == 0 else (a[layer][:, :-2], b[layer][:, :-2])
        assert torch.equal(*rest)  # at layer l's input only the prompt positions differ


def test_per_candidate_results_equal_one_at_a_time(model: PromptedCLIP) -> None:
    batch = model.tokenize(CLASSES)
    ctx = torch.randn(3, len(CLASSES), 3, 32, generator=_gen(4)) * 0.05  # per-class context
    deep_t = torch.randn(3, 2, 3, 32, generator=_gen(5)) * 0.3
    prompt, deep_v = torch.randn(3, 2, 32, generator=_gen(6)), torch.randn(3, 3, 2, 32, generator=_gen(7)) * 0.3
    pixels = _pixels(model, 5)
    old = model.max_batch_images
    try:
        model.max_batch_images = 4  # micro-batches cut through candidates and images
        text = model.encode_text(batch, ctx, deep=deep_t)
        image = model.encode_images(pixels, prompt, "post_ln", deep=deep_v)
    finally:
        model.max_batch_images = old
    for i in range(3):
        torch.testing.assert_close(text[i], model.encode_text(batch, ctx[i : i + 1], deep=deep_t[i : i + 1])[0], atol=1e-6, rtol=0)
        one = model.encode_images(pixels, prompt[i : i + 1], "post_ln", deep=deep_v[i : i + 1])[0]
        torch.testing.assert_close(image[i], one, atol=1e-6, rtol=0)
    assert not torch.allclose(text[0], text[1]) and not torch.allclose(image[0], image[1])


def test_deep_prompts_need_their_shallow_prompt_of_the_same_length(model: PromptedCLIP) -> None:
    batch = model.tokenize(CLASSES)
    with pytest.raises(ValueError, match="deep text prompt"):
        model.encode_text(batch, torch.zeros(1, 3, 32), deep=torch.zeros(1, 1, 2, 32))
    with pytest.raises(ValueError, match="tower has 4"):
        model.encode_text(batch, torch.zeros(1, 3, 32), deep=torch.zeros(1, 4, 3, 32))
    with pytest.raises(ValueError, match="deep visual prompt"):
        model.encode_images(_pixels(model, 1), None, deep=torch.zeros(1, 1, 2, 32))


def test_published_hidden_stats_one_per_layer_input_clipped(model: PromptedCLIP) -> None:
    lim = model.limits
    assert (lim.text_layers, lim.vision_layers) == (DEPTH, DEPTH)
    for stds in (lim.text_hidden_std, lim.vision_hidden_std):
        assert len(stds) == DEPTH and all(np.isfinite(stds)) and min(stds) > 0
    assert PromptedCLIP(tiny_random_clip(seed=1, layers=DEPTH)).limits == lim  # a fixed probe
    values = torch.cat([torch.randn(10_000, generator=_gen()), torch.tensor([1e3, -1e3])])
    assert layers.clipped_std(values) == pytest.approx(1.0, abs=0.05) and float(values.std()) > 10


def test_added_deep_prompts_are_offsets_to_the_states_and_zero_is_the_shallow_prompt(model: PromptedCLIP) -> None:
    batch, pixels = model.tokenize(CLASSES), _pixels(model, 1)
    ctx, prompt = torch.randn(1, 3, 32, generator=_gen()) * 0.02, torch.randn(1, 2, 32, generator=_gen(1))
    zero_t, zero_v = torch.zeros(1, DEPTH - 1, 3, 32), torch.zeros(1, DEPTH - 1, 2, 32)
    assert torch.equal(model.encode_text(batch, ctx, deep=zero_t, deep_mode="add"), model.encode_text(batch, ctx))
    assert torch.equal(model.encode_images(pixels, prompt, "post_ln", deep=zero_v, deep_mode="add"),
                       model.encode_images(pixels, prompt, "post_ln"))
    # add(offset) == replace(state + offset) at a single deep layer (the state there is the shallow run's)
    tokens = torch.cat([model._vision.pre_layrnorm(model._vision.embeddings(pixels)), prompt], dim=1)
    capture: list[torch.Tensor] = []
    with torch.inference_mode():
        layers.vision_hidden(model._vision, tokens, capture=capture)
    offset = torch.randn(1, 1, 2, 32, generator=_gen(3))
    added = model.encode_images(pixels, prompt, "post_ln", deep=offset, deep_mode="add")
    replaced = model.encode_images(pixels, prompt, "post_ln", deep=capture[1][:, None, -2:] + offset)
    torch.testing.assert_close(added, replaced, atol=1e-5, rtol=0)
    assert not torch.allclose(added, model.encode_images(pixels, prompt, "post_ln"), atol=1e-4)


def test_the_layer_functions_carry_gradients_to_deep_prompts(model: PromptedCLIP) -> None:
    # the white-box ceiling trains the same prompt form in-process: no inference_mode inside server/deep.py
    ctx = torch.randn(3, 32, generator=_gen())
    embeds, eos_at = _text_embeds(model, ctx)
    deep_t = torch.zeros(len(CLASSES), DEPTH - 1, 3, 32, requires_grad=True)
    tokens = _vision_tokens(model, _pixels(model, 2), torch.randn(2, 32, generator=_gen(1)))
    deep_v = torch.zeros(2, DEPTH - 1, 2, 32, requires_grad=True)
    text = layers.text_pooled(model._text, layers.text_hidden(model._text, embeds, deep=deep_t), eos_at)
    image = layers.vision_pooled(model._vision, layers.vision_hidden(model._vision, tokens, deep=deep_v))
    (text.square().sum() + image.square().sum()).backward()
    assert deep_t.grad is not None and deep_v.grad is not None
    assert all(float(g.abs().sum()) > 0 for g in (*deep_t.grad.unbind(1), *deep_v.grad.unbind(1)))
