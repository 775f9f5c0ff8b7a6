"""Feedback objectives (client/feedback.py): each loss from its outputs, the default from the key's
policy, and tuning under every policy against the tiny model in-process (paper's size included)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.client.api import ClipClient
from bptvlm.client.config import TuneConfig
from bptvlm.client.feedback import (LEGACY_ACCESS, Feedback, parse_top_k, resolve_feedback, softmax,
                                    top_k_true_probability)
from bptvlm.client.run import start
from bptvlm.server.app import create_app
from bptvlm.server.config import Settings
from bptvlm.server.ledger import Ledger
from bptvlm.shared.protocol import OutputAccess

from .test_client_integration import _colour_task

POLICIES = ("logits", "probs", "loss", "topk:2", "label")


def _task(size: int):  # type: ignore[no-untyped-def]
    """The colour task with a validation split (12 images) besides train (18) and test (15)."""
    data, val = _colour_task(size), _colour_task(size, n_train=12)
    return dataclasses.replace(data, val_images=val.train_images, val_labels=val.train_labels)


def _access(policy: str) -> OutputAccess:
    from bptvlm.server.policy import access, parse_policy

    return OutputAccess.model_validate(access(parse_policy(policy), None, 0.0))


# the server's loss where allowed (the same cross-entropy as from logits, one float a candidate), else the richest
@pytest.mark.parametrize(("policy", "default"), [("logits", "loss"), ("probs", "loss"), ("loss", "loss"),
                                                 ("topk:2", "topk"), ("label", "label")])
def test_the_default_feedback_is_the_loss_else_the_richest_the_policy_allows(policy: str, default: str) -> None:
    assert resolve_feedback(None, _access(policy)) == default
    assert resolve_feedback(None, LEGACY_ACCESS) == "loss"  # a server from before policies: as tuning always was


def test_a_feedback_the_policy_does_not_allow_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"policy 'topk:2' allows topk, label; choose --feedback among topk, label"):
        resolve_feedback("probs", _access("topk:2"))
    with pytest.raises(ValueError, match="K <= 2"):
        resolve_feedback("topk:5", _access("topk:2"))
    with pytest.raises(ValueError, match="feedback must be one of"):
        TuneConfig(feedback="hard-labels")


def test_cross_entropy_from_logits_and_probs_and_the_label_error_rate() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 7)
    ce = -np.log(softmax(logits)[:, np.arange(7), labels]).mean(-1)
    np.testing.assert_allclose(Feedback("logits").loss({"logits": logits}, labels, 4), ce, rtol=1e-6)
    probs = softmax(logits).astype(np.float32)
    np.testing.assert_allclose(Feedback("probs").loss({"probs": probs}, labels, 4), ce, rtol=1e-5)
    label = logits.argmax(-1)
    np.testing.assert_array_equal(Feedback("label").loss({"label": label}, labels, 4), (label != labels).mean(-1))
    zero = np.zeros((1, 2, 4), np.float32)
    assert np.isfinite(Feedback("probs").loss({"probs": zero}, labels[:2], 4)).all()  # rounded to 0: floored


def test_top_k_cross_entropy_spreads_the_unseen_mass() -> None:
    top = np.array([[[b"0.600000:2", b"0.300000:0"], [b"0.500000:1", b"0.400000:3"]]], dtype=object)  # [1, 2, 2]
    values, indices = parse_top_k(top)
    assert indices.tolist() == [[[2, 0], [1, 3]]] and values[0, 0, 0] == 0.6
    p_y = top_k_true_probability(values, indices, np.array([0, 2]), num_classes=5)
    # image 0: label 0 is seen (0.3); image 1: label 2 unseen, mass 0.1 over 3 unseen classes
    np.testing.assert_allclose(p_y, [[0.3, 0.1 / 3]])
    capped = top_k_true_probability(np.array([[[0.5, 0.01]]]), np.array([[[0, 1]]]), np.array([4]), num_classes=3)
    np.testing.assert_allclose(capped, [[0.01]])  # the unseen class is at most the K-th value
    loss = Feedback("topk", 2).loss({"topk": top}, np.array([0, 2]), 5)
    np.testing.assert_allclose(loss, [-(np.log(0.3) + np.log(0.1 / 3)) / 2])


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    path = tmp_path_factory.mktemp("feedback") / "ledger.db"
    ledger = Ledger(path)
    tokens = {pol: ledger.create_key(f"k-{pol}", outputs=pol) for pol in POLICIES}
    ledger.close()
    with TestClient(create_app(Settings(model="tiny-random", device="cpu", ledger=str(path), ready_probe_s=0))) as http:
        yield http, tokens


@pytest.mark.parametrize("policy", POLICIES)
def test_tuning_runs_under_every_policy_and_reports_accuracy_where_labels_come(keyed, policy: str) -> None:
    http, tokens = keyed
    client = ClipClient("http://testserver", http=http, api_key=tokens[policy])
    data = _task(client.prompt_limits().image_size)
    result = start(client, data, TuneConfig(budget=20, popsize=10, variant="text", d_text=40, eval_every=10), None,
                   progress=False)
    s = result.summary
    assert s["feedback"] == resolve_feedback(None, _access(policy)) and s["train_queries"] == 20
    if policy == "loss":  # no labels through the API: chosen by validation loss, no accuracy to report
        assert s["test_accuracy"] is None and s["selected_by"] == "val_loss"
    else:
        assert 0.0 <= s["test_accuracy"] <= 1.0 and 0.0 <= s["zero_shot_accuracy"] <= 1.0
        assert s["selected_by"] == "val_accuracy"
        assert all(r.get("val_accuracy") is not None for r in result.history if "val_loss" in r)


def test_logits_feedback_is_the_servers_cross_entropy(keyed) -> None:
    http, tokens = keyed
    client = ClipClient("http://testserver", http=http, api_key=tokens["logits"])
    data = _task(client.prompt_limits().image_size)
    losses = {}
    for feedback in ("logits", "probs", "loss"):
        r = start(client, data, TuneConfig(budget=10, popsize=10, variant="text", d_text=40, feedback=feedback,
                                           eval_every=0), None, progress=False)
        losses[feedback] = r.summary["initial_train_loss"]
    assert losses["logits"] == pytest.approx(losses["loss"], rel=1e-5) == pytest.approx(losses["probs"], rel=1e-5)


def test_label_feedback_at_the_papers_size(keyed) -> None:
    """500 + 500 dimensions, population 30, joint prompts, hard labels only: whole generations to the budget."""
    http, tokens = keyed
    client = ClipClient("http://testserver", http=http, api_key=tokens["label"])
    data = _task(client.prompt_limits().image_size)
    config = TuneConfig(budget=90, popsize=30, variant="joint", d_text=500, d_vision=500, eval_every=0)
    result = start(client, data, config, None, progress=False)
    s = result.summary
    assert (s["feedback"], s["d_text"], s["d_vision"], s["train_queries"]) == ("label", 500, 500, 90)
    assert [r["queries"] for r in result.history] == [30, 60, 90]
    assert all(0.0 <= r["best_loss"] <= 1.0 for r in result.history)  # error rates


def test_asked_degradations_reach_training_and_validation_not_test(keyed) -> None:
    http, tokens = keyed
    client = ClipClient("http://testserver", http=http, api_key=tokens["logits"])
    sent: list[tuple[str, dict]] = []
    infer = client.infer

    def spy(inputs, **kw):  # type: ignore[no-untyped-def]
        sent.append((len(inputs["labels"]), dict(kw.get("parameters") or {})))
        return infer(inputs, **kw)

    client.infer = spy  # type: ignore[method-assign]
    data = _task(client.prompt_limits().image_size)
    start(client, data, TuneConfig(budget=10, popsize=10, variant="text", d_text=40, output_noise=0.5,
                                   output_decimals=2, eval_every=0), None, progress=False)
    n_test = len(data.test_labels)
    for n, params in sent:
        degraded = params.get("output_noise") == 0.5 and params.get("output_decimals") == 2
        assert degraded == (n != n_test), (n, params)


@pytest.mark.slow
def test_a_label_only_key_tuning_through_the_cli_beats_zero_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """shape_synonym on the embedded model: class names the captions never use, so zero-shot is poor."""
    from bptvlm.cli import common

    from .test_client_integration import _parser

    ledger = tmp_path / "ledger.db"
    db = Ledger(ledger)
    token = db.create_key("labels", outputs="label")
    db.close()
    settings = Settings(model="embedded", device="cpu", ledger=str(ledger), ready_probe_s=0)
    with TestClient(create_app(settings)) as http:
        monkeypatch.setattr(common, "make_client", lambda args: ClipClient(args.endpoint, http=http, api_key=token))
        args = _parser().parse_args(["tune", "--task", "shape_synonym", "--budget", "300", "--eval-every", "0",
                                     "--out", str(tmp_path / "run"), "--no-progress"])
        assert args.func(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["feedback"] == "label"  # the default under a label-only key
    assert summary["test_accuracy"] > summary["zero_shot_accuracy"] + 0.1, summary
