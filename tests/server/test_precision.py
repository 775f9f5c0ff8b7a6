"""The served dtype: ``--dtype auto`` follows the hardware, and bf16 scores candidates as float32 does.

Accuracy guard (embedded model, 24 candidates drawn through the client's own projection, joint
prompts, 8 shots): bf16 logits within ``MAX_LOGIT_ERROR`` x logit scale of float32 at worst and
``MEAN_LOGIT_ERROR`` x logit scale on average, and the candidates' losses ranked alike (Spearman >= 0.99).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from bptvlm.client.projection import PromptProjection
from bptvlm.cli import serve as server_cli
from bptvlm.server import precision
from bptvlm.server.app import create_app
from bptvlm.server.config import DTYPE_CHOICES, Settings
from bptvlm.server.loading import load_model
from bptvlm.server.model import PromptedCLIP, loss_per_candidate
from bptvlm.world.tasks import load_task

# Seen during development (16 shots, 30 candidates, four tasks, sigma 0.3 and 1): worst 0.022, mean
# 0.0015-0.0023, Spearman 0.997-1.000.
MAX_LOGIT_ERROR = 0.04  # of the logit scale (a cosine)
MEAN_LOGIT_ERROR = 0.005
MIN_SPEARMAN = 0.99

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\nprocessor\t: 1\n"


def _cpuinfo(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    return path


@pytest.mark.parametrize(
    ("extra", "fast"),
    [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False), ("", False)],
    ids=["avx512-bf16", "amx", "vnni-only", "plain-avx512"],
)
def test_auto_follows_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, fast: bool) -> None:
    flags = precision.cpu_flags(_cpuinfo(tmp_path, extra))
    assert flags is not None and "avx512f" in flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    expected = torch.bfloat16 if fast else torch.float32
    assert precision.resolve_dtype("auto", torch.device("cpu")) == expected


def test_without_cpuinfo_torch_probes_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert precision.cpu_flags(tmp_path / "absent") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.cpu_has_fast_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.cpu_has_fast_bf16()


@pytest.mark.parametrize("native", [True, False], ids=["bf16-gpu", "old-gpu"])
def test_auto_on_cuda_asks_for_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native and not including_emulation)
    assert precision.resolve_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else torch.float32)


def test_forced_and_unknown_dtypes() -> None:
    for name in ("float32", "bfloat16", "float16"):
        assert precision.dtype_name(precision.resolve_dtype(name, torch.device("cpu"))) == name
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        precision.resolve_dtype("fp8", torch.device("cpu"))
    assert server_cli.DTYPE_CHOICES == DTYPE_CHOICES  # the flag's choices are the settings' (kept torch-free)
    assert Settings().dtype == "auto"


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16"])
def test_served_dtype_is_in_the_metadata_and_what_is_cached(name: str) -> None:
    served = precision.dtype_name(precision.resolve_dtype(name, torch.device("cpu")))
    with TestClient(create_app(Settings(model="tiny-random", device="cpu", dtype=name))) as c:  # type: ignore[arg-type]
        assert c.get("/v2/models/clip").json()["parameters"]["dtype"] == served
        model = c.app.state.service.model  # type: ignore[attr-defined]
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pixels = model.preprocess(images)  # what the image cache keeps
    features = model.encode_images(pixels)  # what the feature caches keep
    assert precision.dtype_name(pixels.dtype) == served and precision.dtype_name(features.dtype) == served
    logits = model.logits(features, model.encode_text(model.tokenize(["a dog.", "a cat."])))
    assert logits.dtype == torch.float32
    assert loss_per_candidate(logits, torch.tensor([0, 1, 0])).dtype == torch.float32


@pytest.fixture(scope="module")
def embedded_pair() -> tuple[PromptedCLIP, PromptedCLIP]:
    loaded = load_model("embedded")
    return PromptedCLIP(copy.deepcopy(loaded)), PromptedCLIP(loaded, dtype=torch.bfloat16)


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


@pytest.mark.parametrize("task", ["shape_synonym", "count"])
def test_bf16_scores_a_population_as_float32_does(embedded_pair: tuple[PromptedCLIP, PromptedCLIP], task: str) -> None:
    fp32, bf16 = embedded_pair
    data = load_task(task, shots=8, seed=0)
    texts = [data.template.format(c) for c in data.class_names]
    projection = PromptProjection(fp32.limits, sigma=1.0, seed=0)
    prompts = projection(np.random.default_rng(1).standard_normal((24, projection.dimension)).astype(np.float32))
    labels = torch.from_numpy(np.asarray(data.train_labels))
    results = []
    for model in (fp32, bf16):
        image = model.encode_images(model.preprocess(data.train_images), torch.from_numpy(prompts["visual_prompt"]))
        text = model.encode_text(model.tokenize(texts), torch.from_numpy(prompts["text_context"]))
        logits = model.logits(image, text)  # [24, N, C]
        assert logits.dtype == torch.float32
        results.append((logits, loss_per_candidate(logits, labels).numpy()))
    assert bf16.limits == fp32.limits  # published statistics do not depend on the served dtype
    (l32, loss32), (l16, loss16) = results
    scale = float(fp32.model.logit_scale.exp())
    error = (l32 - l16).abs() / scale
    assert float(error.max()) <= MAX_LOGIT_ERROR and float(error.mean()) <= MEAN_LOGIT_ERROR
    assert np.ptp(loss32) > 0.5  # the population is spread enough for its ranking to mean something
    spearman = np.corrcoef(_ranks(loss32), _ranks(loss16))[0, 1]
    assert spearman >= MIN_SPEARMAN, f"loss ranking agreement {spearman:.4f} < {MIN_SPEARMAN}"
