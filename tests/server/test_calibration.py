"""The start-up measurement of the vision chunk: it picks the fastest size it timed, and serve uses it."""

from __future__ import annotations

import time

import pytest

from bptvlm.server import app as app_module
from bptvlm.server import calibration
from bptvlm.server.config import Settings
from bptvlm.server.model import PromptedCLIP


def _fake_rates(peak: int, calls: list[int]):  # type: ignore[no-untyped-def]
    def rate(model: PromptedCLIP, size: int, min_s: float = 0.0, repeats: int = 1) -> float:
        calls.append(size)
        return 1000.0 / (1 + abs(size.bit_length() - peak.bit_length()))  # fastest at `peak`, slower either side

    return rate


@pytest.mark.parametrize("peak", [16, 64, 1024], ids=["smallest", "middle", "largest"])
def test_picks_the_fastest_size_and_stops_past_it(tiny_model: PromptedCLIP, monkeypatch: pytest.MonkeyPatch, peak: int) -> None:
    calls: list[int] = []
    monkeypatch.setattr(calibration, "images_per_second", _fake_rates(peak, calls))
    saved = tiny_model.max_batch_images
    try:
        assert calibration.measure_batch_images(tiny_model, budget_s=1e9) == peak == tiny_model.max_batch_images
    finally:
        tiny_model.max_batch_images = saved
    tried = sorted(set(calls[1:]))  # after the warm-up
    assert max(tried) == min(calibration.CANDIDATES[-1], peak * 2)  # one size past the peak ends the search
    assert all(calls[1:].count(s) == calibration.ROUNDS for s in tried)  # every size reached is timed each round


def test_a_budget_spent_on_one_size_keeps_the_formula(tiny_model: PromptedCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(model: PromptedCLIP, size: int, min_s: float = 0.0, repeats: int = 1) -> float:
        time.sleep(0.05)
        return float(size)  # larger is faster: without the budget, the largest would win

    monkeypatch.setattr(calibration, "images_per_second", slow)
    saved = tiny_model.max_batch_images
    assert calibration.measure_batch_images(tiny_model, budget_s=0.01) == saved == tiny_model.max_batch_images


def test_real_measurement_returns_a_timed_size(tiny_model: PromptedCLIP) -> None:
    saved = tiny_model.max_batch_images
    try:
        chosen = calibration.measure_batch_images(tiny_model, candidates=(16, 32), budget_s=60.0, rounds=2)
    finally:
        tiny_model.max_batch_images = saved
    assert chosen in (16, 32)
    assert calibration.images_per_second(tiny_model, 8, min_s=0.01) > 0 and tiny_model.max_batch_images == saved


@pytest.mark.parametrize(("measure", "given", "expected_calls"), [(True, None, 1), (False, None, 0), (True, 64, 0)],
                         ids=["measured", "formula", "given"])
def test_serve_measures_only_without_a_chunk(monkeypatch: pytest.MonkeyPatch, measure: bool, given: int | None,
                                             expected_calls: int) -> None:
    calls: list[int] = []
    monkeypatch.setattr(app_module, "measure_batch_images", lambda model: calls.append(1))
    service = app_module.build_service(Settings(model="tiny-random", device="cpu", measure_chunks=measure,
                                                max_batch_images=given))
    assert len(calls) == expected_calls
    if given:
        assert service.model.max_batch_images == given
