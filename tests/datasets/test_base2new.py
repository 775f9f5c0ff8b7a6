"""Base-to-new on a hand-checked case, and runs through the real server app (tiny-random CLIP, in-process)
on generated CoOp-layout data sets: ``tune --dataset``, ``--protocol base2new`` and ``eval --dataset``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bptvlm.cli import common, tune as cli
from bptvlm.client.api import ClipClient
from bptvlm.client.base2new import harmonic_mean, split_base_new
from bptvlm.client.config import TuneConfig
from bptvlm.client.data import FewShotData
from bptvlm.client.evaluate import evaluate_saved
from bptvlm.server.app import create_app
from bptvlm.server.config import Settings

from .layout import write_layout


def test_base_and_new_halves_by_hand() -> None:
    """5 classes: base = labels 0, 1, 2 (ceil(5/2)), new = 3, 4 relabelled 0, 1; new keeps only test images."""
    img = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)  # image i has pixel value i
    labels = np.array([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    data = FewShotData(list("abcde"), img, labels, img[::-1], labels[::-1].copy(), img[:5], labels[:5], "a {}.")
    base, new = split_base_new(data)
    assert base.class_names == ["a", "b", "c"] and new.class_names == ["d", "e"]
    assert base.train_labels.tolist() == [0, 1, 2, 2, 1, 0] and base.train_images[:, 0, 0, 0].tolist() == [0, 1, 2, 7, 8, 9]
    assert base.val_labels is not None and base.val_labels.tolist() == [0, 1, 2]
    assert base.test_labels.tolist() == [0, 1, 2, 2, 1, 0] and base.test_images[:, 0, 0, 0].tolist() == [9, 8, 7, 2, 1, 0]
    assert new.test_labels.tolist() == [0, 1, 1, 0] and new.test_images[:, 0, 0, 0].tolist() == [6, 5, 4, 3]
    assert len(new.train_labels) == 0 and base.template == new.template == "a {}."
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4) == pytest.approx(0.6857142857)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.0) == 0.0


def test_base2new_needs_a_context_that_new_classes_can_use() -> None:
    with pytest.raises(ValueError, match="text_context 'shared'"):
        TuneConfig(protocol="base2new", text_context="per_class")
    with pytest.raises(ValueError, match="at least 4 classes"):
        split_base_new(FewShotData(list("abc"), *(np.zeros((3, 1, 1, 3), np.uint8), np.arange(3)) * 2))


@pytest.fixture(scope="module")
def app_http() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model="tiny-random", device="cpu"))) as http:
        yield http


def _run(app_http: TestClient, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    monkeypatch.setattr(common, "make_client", lambda args: ClipClient(args.endpoint, http=app_http))
    parser = argparse.ArgumentParser(prog="bptvlm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([argv[0], "--endpoint", "http://testserver", *argv[1:]])
    return int(args.func(args))


SMALL = ["--shots", "2", "--val-shots", "1", "--popsize", "5", "--budget", "20", "--intrinsic-dim-text", "12",
         "--intrinsic-dim-vision", "12", "--n-ctx-text", "4", "--n-ctx-vision", "2", "--seed", "1", "--no-progress"]  # fmt: skip


def test_tune_base2new_on_a_coop_layout_then_eval_on_another_data_set(
    app_http: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pets = write_layout("OxfordPets", tmp_path / "DATA")  # 5 classes: 3 base, 2 new
    write_layout("DTD", tmp_path / "DATA")
    out = tmp_path / "run"
    root = str(tmp_path / "DATA")
    assert _run(app_http, monkeypatch, ["tune", "--preset", "paper", "--dataset", "oxford_pets", "--data-root", root,
                                        "--protocol", "base2new", *SMALL, "--out", str(out)]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "OxfordPets" and s["protocol"] == "base2new" and s["template"] == "a photo of a {}, a type of pet."
    assert s["base_classes"] == s["class_names"] == ["abyssinian", "american bulldog", "beagle"]
    assert s["new_classes"] == ["bengal", "birman"] and s["num_train"] == 6 and s["num_test"] == 6 and s["num_test_new"] == 4
    assert s["base_accuracy"] == s["test_accuracy"] and s["harmonic_mean"] == pytest.approx(
        harmonic_mean(s["base_accuracy"], s["new_accuracy"]))
    assert s["zero_shot_harmonic_mean"] == pytest.approx(harmonic_mean(s["base_zero_shot_accuracy"], s["new_zero_shot_accuracy"]))
    assert s["train_queries"] == 20
    from bptvlm.client.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoint.pkl").summary == s  # what `tune --resume` re-reports
    # the new classes' accuracy is the saved prompt's on their test images, as `eval` computes it
    full = __import__("bptvlm.data", fromlist=["load_data"]).load_data(
        "OxfordPets", seed=1, shots=2, val_shots=1, image_size=app_http.get("/v2/models/clip").json()["parameters"]["prompt"]["image_size"],
        data_root=root)
    _, new = split_base_new(full)
    with ClipClient("http://testserver", http=app_http) as client:
        assert evaluate_saved(client, out / "prompts.safetensors", new)["test_accuracy"] == s["new_accuracy"]
    capsys.readouterr()

    # cross-data-set transfer: the prompt tuned on pets, tested on DTD's classes with `eval --dataset`
    assert _run(app_http, monkeypatch, ["eval", "--dataset", "DTD", "--data-root", root, "--prompts", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_test"] == 8 and result["eval_queries"] == 3 and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["template"] == "a photo of a {}, a type of pet." and result["data_template"] == "{} texture."
    assert 0.0 <= result["zero_shot_accuracy_data_template"] <= 1.0
    assert pets.class_names[0] == "abyssinian"


def test_tune_errors_name_the_data_set_file(app_http: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "DATA" / "eurosat").mkdir(parents=True)
    code = _run(app_http, monkeypatch, ["tune", "--dataset", "EuroSAT", "--data-root", str(tmp_path / "DATA"), *SMALL,
                                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == common.EXIT_USAGE
    assert "eurosat/split_zhou_EuroSAT.json not found; get split_zhou_EuroSAT.json from https://drive.google.com" in caplog.text
    code = _run(app_http, monkeypatch, ["tune", "--dataset", "EuroSAT", "--task", "shape", *SMALL, "--out", str(tmp_path / "r2")])
    assert code == common.EXIT_USAGE and "give one of --data, --task or --dataset, not --task and --dataset" in caplog.text


def test_a_dataset_run_resumes_from_its_own_settings(app_http: TestClient, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume takes --dataset and --data-root from the checkpoint; a larger --budget extends the run."""
    write_layout("FGVCAircraft", tmp_path / "DATA")
    out = tmp_path / "run"
    small = [a for a in SMALL if a not in ("--budget", "20")]
    assert _run(app_http, monkeypatch, ["tune", "--preset", "paper", "--dataset", "Aircraft", "--data-root",
                                        str(tmp_path / "DATA"), *small, "--budget", "10", "--out", str(out)]) == 0  # fmt: skip
    assert _run(app_http, monkeypatch, ["tune", "--resume", str(out), "--budget", "15", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["dataset"], s["train_queries"], s["template"]) == ("FGVCAircraft", 15, "a photo of a {}, a type of aircraft.")
    assert s["class_names"] == ["707-320", "727-200", "A300B4", "F-16A/B"] and s["num_test"] == 8
