"""Fixtures shared by the whole suite: a tiny random-weight CLIP, built locally (no hub)."""

from __future__ import annotations

import os

import pytest

# Servers built by tests (in-process and subprocesses) take the formula's vision chunk instead of measuring
# one at start-up (seconds each); tests/server/test_calibration.py measures.
os.environ.setdefault("BPTVLM_MEASURE_CHUNKS", "false")

from bptvlm.server.config import Settings
from bptvlm.server.loading import tiny_random_clip
from bptvlm.server.model import PromptedCLIP


@pytest.fixture(scope="session")
def tiny_model() -> PromptedCLIP:
    return PromptedCLIP(tiny_random_clip(seed=0))


@pytest.fixture()
def settings() -> Settings:
    return Settings(model="tiny-random", device="cpu")
