"""Fixtures shared by the whole suite: a tiny random-weight CLIP, built locally (no hub)."""

from __future__ import annotations

import pytest

from bptvlm.server.config import Settings
from bptvlm.server.loading import tiny_random_clip
from bptvlm.server.model import PromptedCLIP


@pytest.fixture(scope="session")
def tiny_model() -> PromptedCLIP:
    return PromptedCLIP(tiny_random_clip(seed=0))


@pytest.fixture()
def settings() -> Settings:
    return Settings(model="tiny-random", device="cpu")
