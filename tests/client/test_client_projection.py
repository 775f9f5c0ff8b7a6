"""PromptProjection: shapes, seeding, and the paper's initialisation statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bptvlm.client.projection import PromptProjection
from bptvlm.shared.protocol import TEXT_CONTEXT, VISUAL_PROMPT, PromptLimits

from .conftest import LIMITS

WIDE = LIMITS.model_copy(update={"text_width": 64, "vision_width": 48, "patch_size": 8})


def test_population_first_shapes() -> None:
    proj = PromptProjection(LIMITS, n_ctx_text=4, n_ctx_vision=3, d_text=10, d_vision=7)
    assert proj.dimension == 17
    out = proj(np.ones((5, 17)))
    assert out[TEXT_CONTEXT].shape == (5, 4, LIMITS.text_width) and out[TEXT_CONTEXT].dtype == np.float32
    assert out[VISUAL_PROMPT].shape == (5, 3, LIMITS.vision_width) and out[VISUAL_PROMPT].dtype == np.float32


def test_class_contexts_give_one_text_context_per_class() -> None:
    proj = PromptProjection(LIMITS, n_ctx_text=4, n_ctx_vision=3, d_text=10, d_vision=7, class_contexts=5)
    assert proj.dimension == 17 and proj.config()["class_contexts"] == 5
    out = proj(np.random.default_rng(0).normal(size=(2, 17)))
    assert out[TEXT_CONTEXT].shape == (2, 5, 4, LIMITS.text_width)
    assert out[VISUAL_PROMPT].shape == (2, 3, LIMITS.vision_width)
    assert not np.allclose(out[TEXT_CONTEXT][:, 0], out[TEXT_CONTEXT][:, 1])  # classes get their own vectors
    assert PromptProjection(LIMITS, d_text=0, d_vision=7, class_contexts=5).config()["class_contexts"] == 0


def test_mixed_context_shares_its_first_dims_across_classes() -> None:
    proj = PromptProjection(LIMITS, n_ctx_text=2, d_text=10, d_vision=0, class_contexts=3, shared_text_dims=4)
    assert proj.config()["shared_text_dims"] == 4
    shared_only, own_only = np.zeros((1, 10)), np.zeros((1, 10))
    shared_only[0, :4], own_only[0, 4:] = 1.0, 1.0
    ctx = proj(shared_only)[TEXT_CONTEXT][0]  # [C, n, D]
    assert ctx.any()
    for c in (1, 2):  # the same columns of A_text (equal up to BLAS summation order)
        np.testing.assert_allclose(ctx[c], ctx[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(proj.a_text[:4, : 2 * LIMITS.text_width], proj.a_text[:4, 2 * LIMITS.text_width : 4 * LIMITS.text_width])
    ctx = proj(own_only)[TEXT_CONTEXT][0]
    assert not np.allclose(ctx[0], ctx[1]) and not np.allclose(ctx[1], ctx[2])
    with pytest.raises(ValueError, match="shared_text_dims=4 needs class contexts"):
        PromptProjection(LIMITS, d_text=10, shared_text_dims=4)


def test_candidates_are_independent_rows() -> None:
    proj = PromptProjection(LIMITS, d_text=10, d_vision=7, n_ctx_text=2, n_ctx_vision=2)
    z = np.random.default_rng(0).normal(size=(4, 17))
    together = proj(z)
    for i in range(4):
        alone = proj(z[i : i + 1])
        for name in together:
            np.testing.assert_allclose(alone[name][0], together[name][i], rtol=1e-5, atol=1e-7)


def test_zero_is_zero() -> None:
    out = PromptProjection(LIMITS, d_text=10, d_vision=7)(np.zeros((1, 17)))
    assert not out[TEXT_CONTEXT].any() and not out[VISUAL_PROMPT].any()


@pytest.mark.parametrize(
    ("kwargs", "keys", "dim"),
    [
        ({"d_vision": 0}, {TEXT_CONTEXT}, 10),
        ({"n_ctx_vision": 0}, {TEXT_CONTEXT}, 10),
        ({"d_text": 0}, {VISUAL_PROMPT}, 7),
        ({"n_ctx_text": 0}, {VISUAL_PROMPT}, 7),
    ],
    ids=["no-vision-dims", "no-vision-tokens", "no-text-dims", "no-text-tokens"],
)
def test_disabled_modality_is_absent(kwargs: dict[str, int], keys: set[str], dim: int) -> None:
    proj = PromptProjection(LIMITS, **{"d_text": 10, "d_vision": 7, **kwargs})
    assert proj.dimension == dim
    assert set(proj(np.zeros((2, dim)))) == keys == set(proj.modalities)


def test_same_seed_same_matrices_other_seed_other_matrices() -> None:
    a = PromptProjection(LIMITS, d_text=10, d_vision=7, seed=3)
    b = PromptProjection(LIMITS, d_text=10, d_vision=7, seed=3)
    c = PromptProjection(LIMITS, d_text=10, d_vision=7, seed=4)
    np.testing.assert_array_equal(a.a_text, b.a_text)
    np.testing.assert_array_equal(a.a_vision, b.a_vision)
    assert not np.allclose(a.a_text, c.a_text)


def test_switching_one_modality_off_keeps_the_other_matrix() -> None:
    joint = PromptProjection(LIMITS, d_text=10, d_vision=7, seed=1)
    text_only = PromptProjection(LIMITS, d_text=10, d_vision=0, seed=1)
    vision_only = PromptProjection(LIMITS, d_text=0, d_vision=7, seed=1)
    np.testing.assert_array_equal(joint.a_text, text_only.a_text)
    np.testing.assert_array_equal(joint.a_vision, vision_only.a_vision)


def test_text_init_statistics() -> None:
    d, sigma = 200, 2.0
    proj = PromptProjection(WIDE, d_text=d, d_vision=0, n_ctx_text=8, sigma=sigma)
    expected = WIDE.token_embedding_std / (math.sqrt(d) * sigma)
    assert abs(proj.a_text.mean()) < 0.02 * expected
    assert proj.a_text.std() == pytest.approx(expected, rel=0.02)


def test_vision_pre_ln_init_uses_the_served_patch_pixels() -> None:
    d, sigma = 100, 0.5
    proj = PromptProjection(WIDE, d_text=0, d_vision=d, n_ctx_vision=8, sigma=sigma, visual_prompt_position="pre_ln")
    k = WIDE.num_channels * WIDE.patch_size**2  # 3 x 8 x 8 = 192 here; 3072 for ViT-B/32
    assert k == 192
    std = WIDE.patch_embedding_std * math.sqrt(k / d) * sigma
    assert proj.a_vision.mean() == pytest.approx(WIDE.patch_embedding_mean * k / d, abs=0.02 * std)
    assert proj.a_vision.std() == pytest.approx(std, rel=0.02)


def test_vision_post_ln_init_is_scaled_like_text() -> None:
    d, sigma = 100, 2.0
    proj = PromptProjection(WIDE, d_text=0, d_vision=d, n_ctx_vision=8, sigma=sigma, visual_prompt_position="post_ln")
    expected = WIDE.patch_token_std / (math.sqrt(d) * sigma)
    assert abs(proj.a_vision.mean()) < 0.02 * expected
    assert proj.a_vision.std() == pytest.approx(expected, rel=0.02)


def test_prompt_scale_matches_the_embedding_scale_at_unit_z() -> None:
    """With sigma 1 and z ~ N(0, I), text context entries have the token-embedding std."""
    proj = PromptProjection(WIDE, d_text=400, d_vision=0)
    z = np.random.default_rng(0).standard_normal((64, 400))
    assert proj(z)[TEXT_CONTEXT].std() == pytest.approx(WIDE.token_embedding_std, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ctx_text": 9}, "max_text_context=8"),
        ({"n_ctx_vision": 9}, "max_visual_prompt=8"),
        ({"sigma": 0.0}, "sigma"),
        ({"d_text": -1}, "d_text"),
        ({"visual_prompt_position": "middle"}, "pre_ln"),
    ],
    ids=["text-too-long", "vision-too-long", "sigma", "negative-dim", "placement"],
)
def test_invalid_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptProjection(LIMITS, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(17,), (2, 16), (2, 17, 1)], ids=["1d", "short", "3d"])
def test_wrong_z_shape(shape: tuple[int, ...]) -> None:
    proj = PromptProjection(LIMITS, d_text=10, d_vision=7)
    with pytest.raises(ValueError, match=r"z must be \[P, 17\]"):
        proj(np.zeros(shape))


def test_limits_round_trip_as_published() -> None:
    assert PromptLimits.model_validate(LIMITS.model_dump()) == LIMITS
