"""The shipped weights in server/embedded/ load the way the server loads them and reproduce the
model card's zero-shot numbers within one point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bptvlm.world.evaluate import load_dir, zero_shot

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
CARD_PATH = EMBEDDED / "model_card.json"
CARD = json.loads(CARD_PATH.read_text()) if CARD_PATH.exists() else {"tasks": {}}


def test_model_card_is_shipped() -> None:
    assert CARD_PATH.exists() and (EMBEDDED / "MODEL_CARD.md").exists()
    assert CARD["tasks"], "model_card.json lists no tasks"


def test_weights_fit_the_size_budget() -> None:
    size = sum(p.stat().st_size for p in EMBEDDED.iterdir() if p.is_file())
    assert size <= 8 * 2**20
    assert list(EMBEDDED.glob("*.safetensors"))


@pytest.fixture(scope="module")
def shipped():
    return load_dir(EMBEDDED)


@pytest.mark.parametrize("task", sorted(CARD["tasks"]))
def test_zero_shot_matches_the_card(shipped, task: str) -> None:
    model, tokenizer, norm = shipped
    assert zero_shot(model, tokenizer, task, norm) == pytest.approx(CARD["tasks"][task]["zero_shot"], abs=0.01)


def test_card_shows_headroom_and_learning() -> None:
    zs = {name: row["zero_shot"] for name, row in CARD["tasks"].items()}
    assert sum(v <= 0.85 for v in zs.values()) >= 4
    assert sum(zs[name] > 2 * CARD["tasks"][name]["chance"] for name in zs) >= 4
