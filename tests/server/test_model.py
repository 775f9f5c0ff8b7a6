"""The prompted forward is CLIP itself when the prompts are CLIP's own embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bptvlm.shared.protocol import vision_positions
from bptvlm.server.model import PromptedCLIP, loss_per_candidate

CLASSES = ["dog.", "red circle.", "seven.", "a large blue square."]


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _images(n: int = 5, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_template_embeddings_as_context_reproduce_get_text_features(tiny_model: PromptedCLIP) -> None:
    tok = tiny_model.tokenizer
    reference = []
    for name in CLASSES:  # one at a time: no padding, exactly what get_text_features sees
        ids = tok([f"a photo of a {name}"], return_tensors="pt").input_ids
        reference.append(_normalized(tiny_model.model.get_text_features(input_ids=ids).pooler_output)[0])
    context = tiny_model.context_init("a photo of a", 4).unsqueeze(0)  # [1, 4, D]
    prompted = tiny_model.encode_text(tiny_model.tokenize(CLASSES), context)[0]
    torch.testing.assert_close(prompted, torch.stack(reference), atol=1e-5, rtol=0)


def test_without_context_text_is_encoded_verbatim(tiny_model: PromptedCLIP) -> None:
    texts = [f"a photo of a {n}" for n in CLASSES]
    ids = tiny_model.tokenizer(texts, padding=True, return_tensors="pt").input_ids
    reference = _normalized(tiny_model.model.get_text_features(input_ids=ids).pooler_output)
    torch.testing.assert_close(tiny_model.encode_text(tiny_model.tokenize(texts))[0], reference, atol=1e-5, rtol=0)


def test_context_positions_matter(tiny_model: PromptedCLIP) -> None:
    # Guards against a bidirectional text encoder or pooling at the wrong position.
    batch = tiny_model.tokenize(CLASSES)
    ctx = torch.randn(2, 4, tiny_model.limits.text_width) * 0.02
    feats = tiny_model.encode_text(batch, ctx)
    assert feats.shape == (2, len(CLASSES), tiny_model.limits.projection_dim)
    assert not torch.allclose(feats[0], feats[1])


def test_per_class_context_gives_each_class_its_own(tiny_model: PromptedCLIP) -> None:
    # Class c of a per-class context [P, C, n, D] reads exactly what a shared context equal to row c gives it.
    batch = tiny_model.tokenize(CLASSES)
    ctx = torch.randn(2, len(CLASSES), 3, tiny_model.limits.text_width, generator=torch.Generator().manual_seed(0)) * 0.02
    per_class = tiny_model.encode_text(batch, ctx)
    assert per_class.shape == (2, len(CLASSES), tiny_model.limits.projection_dim)
    for c in range(len(CLASSES)):
        shared = tiny_model.encode_text(batch, ctx[:, c])  # every class reads class c's context
        torch.testing.assert_close(per_class[:, c], shared[:, c], atol=1e-6, rtol=0)
    assert not torch.allclose(per_class[:, 0], tiny_model.encode_text(batch, ctx[:, 1])[:, 0])
    with pytest.raises(ValueError, match="3 classes, the request 4"):
        tiny_model.encode_text(batch, ctx[:, :3])
    before, tiny_model.max_batch_images = tiny_model.max_batch_images, len(CLASSES)  # one candidate per chunk
    try:
        torch.testing.assert_close(tiny_model.encode_text(batch, ctx), per_class, atol=1e-6, rtol=0)
    finally:
        tiny_model.max_batch_images = before


@pytest.mark.parametrize("placement", ["pre_ln", "post_ln"])
def test_zero_length_visual_prompt_reproduces_get_image_features(tiny_model: PromptedCLIP, placement: str) -> None:
    pixels = tiny_model.preprocess(_images())
    reference = _normalized(tiny_model.model.get_image_features(pixel_values=pixels).pooler_output)
    empty = torch.zeros(3, 0, tiny_model.limits.vision_width)
    torch.testing.assert_close(tiny_model.encode_images(pixels)[0], reference, atol=1e-5, rtol=0)
    prompted = tiny_model.encode_images(pixels, empty, placement)  # type: ignore[arg-type]
    assert prompted.shape == (3, 5, tiny_model.limits.projection_dim)
    torch.testing.assert_close(prompted, reference.expand(3, -1, -1), atol=1e-5, rtol=0)


def test_micro_batching_gives_the_same_features(tiny_model: PromptedCLIP) -> None:
    pixels = tiny_model.preprocess(_images(7))
    prompt = torch.randn(6, 3, tiny_model.limits.vision_width)
    context = torch.randn(6, 4, tiny_model.limits.text_width) * 0.02
    whole_img, whole_txt = tiny_model.encode_images(pixels, prompt), tiny_model.encode_text(tiny_model.tokenize(CLASSES), context)
    saved = tiny_model.max_batch_images
    try:
        tiny_model.max_batch_images = 3
        torch.testing.assert_close(tiny_model.encode_images(pixels, prompt), whole_img, atol=1e-6, rtol=0)
        torch.testing.assert_close(tiny_model.encode_text(tiny_model.tokenize(CLASSES), context), whole_txt, atol=1e-6, rtol=0)
    finally:
        tiny_model.max_batch_images = saved


def test_placements_differ(tiny_model: PromptedCLIP) -> None:
    pixels = tiny_model.preprocess(_images(3))
    prompt = torch.randn(2, 2, tiny_model.limits.vision_width)
    assert not torch.allclose(tiny_model.encode_images(pixels, prompt, "pre_ln"), tiny_model.encode_images(pixels, prompt, "post_ln"))


def test_zero_add_prompt_is_no_prompt_and_chunks_agree(tiny_model: PromptedCLIP) -> None:
    """The additive placement: zeros at every position change nothing (unlike appended zero tokens)."""
    pixels = tiny_model.preprocess(_images(5))
    positions = vision_positions(tiny_model.limits)
    plain = tiny_model.encode_images(pixels)
    zeros = torch.zeros(2, positions, tiny_model.limits.vision_width)
    torch.testing.assert_close(tiny_model.encode_images(pixels, zeros, "add"), plain.expand(2, -1, -1), atol=1e-5, rtol=0)
    appended = tiny_model.encode_images(pixels, torch.zeros(2, 5, tiny_model.limits.vision_width), "post_ln")
    assert not torch.allclose(appended, plain.expand(2, -1, -1), atol=1e-3)
    prompt = torch.randn(6, positions, tiny_model.limits.vision_width)
    whole = tiny_model.encode_images(pixels, prompt, "add")
    assert not torch.allclose(whole, plain.expand(6, -1, -1), atol=1e-3)
    saved = tiny_model.max_batch_images
    try:
        tiny_model.max_batch_images = 3
        torch.testing.assert_close(tiny_model.encode_images(pixels, prompt, "add"), whole, atol=1e-6, rtol=0)
    finally:
        tiny_model.max_batch_images = saved


def test_loss_is_mean_cross_entropy_per_candidate() -> None:
    logits = torch.randn(4, 9, 3)
    labels = torch.randint(0, 3, (9,))
    expected = torch.stack([F.cross_entropy(logits[i], labels) for i in range(4)])
    torch.testing.assert_close(loss_per_candidate(logits, labels), expected)
    focal = loss_per_candidate(logits, labels, "focal", gamma=0.0)
    torch.testing.assert_close(focal, expected)  # gamma 0 is cross-entropy
    assert (loss_per_candidate(logits, labels, "focal", gamma=2.0) < expected).all()


def test_published_statistics_match_the_weights(tiny_model: PromptedCLIP) -> None:
    lim = tiny_model.limits
    table = tiny_model.model.text_model.embeddings.token_embedding.weight
    conv = tiny_model.model.vision_model.embeddings.patch_embedding.weight
    assert lim.token_embedding_std == pytest.approx(float(table.std()), rel=1e-6)
    assert lim.patch_embedding_mean == pytest.approx(float(conv.mean()), rel=1e-5, abs=1e-8)
    assert lim.patch_embedding_std == pytest.approx(float(conv.std()), rel=1e-6)
    assert (lim.image_size, lim.patch_size, lim.num_channels) == (32, 8, 3)


def test_trimmed_text_equals_full_context_length(tiny_model: PromptedCLIP) -> None:
    # Exact under the causal mask: padding after EOS changes nothing.
    ctx = torch.randn(3, 4, tiny_model.limits.text_width) * 0.02
    batch = tiny_model.tokenize(CLASSES)
    full = tiny_model.encode_text(batch, ctx, pad_to=tiny_model.limits.context_length)
    torch.testing.assert_close(tiny_model.encode_text(batch, ctx), full, atol=1e-5, rtol=0)


def test_default_chunk_shrinks_with_the_vision_width() -> None:
    from bptvlm.server.model import default_batch_images

    assert default_batch_images("cpu", 128) == 256  # the embedded model, measured best at 256
    assert default_batch_images("cpu", 768) == 32  # ViT-B/32, measured best at 32
    assert default_batch_images("cuda", 768) == 4096
