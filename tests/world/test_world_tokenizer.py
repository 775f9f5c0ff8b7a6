"""The caption tokenizer: concatenation property the server relies on, special ids, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from bptvlm.world.corpus import train_tokenizer
from bptvlm.world.tasks import list_tasks


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(seed=0)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


WORDS = st.sampled_from(["a", "photo", "of", "the", "circle", "rhombus", "crimson", "digit", "7", "x",
                         "plus-sign", "shapes", "on", "brick", "zebra", "q"])


@settings(max_examples=60, deadline=None)
@given(prefix=st.lists(WORDS, min_size=1, max_size=6), suffix=st.lists(WORDS, min_size=1, max_size=4))
def test_prefix_and_class_concatenate(tokenizer, prefix: list[str], suffix: list[str]) -> None:
    left, right = " ".join(prefix), " ".join(suffix) + "."
    assert _ids(tokenizer, left) + _ids(tokenizer, right) == _ids(tokenizer, f"{left} {right}")


def test_task_prompts_concatenate_and_fit(tokenizer) -> None:
    for task in list_tasks():
        for name in task.class_names:
            full = task.template.format(name)
            assert _ids(tokenizer, "a photo of a") + _ids(tokenizer, f"{name}.") == _ids(tokenizer, f"a photo of a {name}.")
            assert tokenizer.unk_token_id not in _ids(tokenizer, full)
            assert 16 + len(_ids(tokenizer, f"{name}.")) + 2 <= 32


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token_id != 2  # transformers' legacy argmax pooling otherwise
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("a red circle.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(_ids(tokenizer, "circle."))[-1] == ".</w>"


def test_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a photo of three crimson rhombuses on gravel."
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(_ids(loaded, text)).replace(" .", ".") == text
