"""`bptvlm perf`: every ratio is printed with its two timings, and the size flags reach the measurements."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from bptvlm import perf, roofline
from bptvlm.cli import build_parser, main
from bptvlm.perf import TARGETS, InProcess, format_report, make_workload
from bptvlm.roofline import vision_flops
from bptvlm.server import calibration
from bptvlm.server.loading import tiny_random_clip
from bptvlm.server.model import PromptedCLIP
from bptvlm.server.packed import packing_available
from bptvlm.server.precision import has_fast_bf16


def test_text_population_defaults_to_population() -> None:
    args = build_parser().parse_args(["perf"])
    assert args.text_population is None and args.population == 30 and args.shots == 16 and args.classes == 10
    args = build_parser().parse_args(["perf", "--text-population", "30", "--population", "2", "--shots", "4"])
    assert (args.text_population, args.population, args.shots) == (30, 2, 4)


def test_text_length_is_what_the_model_pads_to(tiny_model) -> None:  # type: ignore[no-untyped-def]
    local = InProcess(tiny_model, make_workload(tiny_model, population=2, shots=1, classes=3))
    ids, _ = tiny_model._assemble_ids(local.tokens, 8)
    assert local.text_length(8) == ids.shape[1] < tiny_model.limits.context_length


def test_report_names_the_text_population() -> None:
    setup = {"model": "m", "device": "cpu", "threads": 1, "population": 2, "micro_population": 6,
             "text_population": 30, "images": 40, "shots": 4, "classes": 10,
             "text_tokens": {"trimmed": 16, "full": 77}, "repeats": 4}
    seconds = dict.fromkeys(["inprocess_joint", "http_joint", "loop_joint", "batched_joint", "http_joint_b",
                             "http_text", "batched_joint_p30", "batched_joint_micro", "text_full",
                             "text_trimmed", "joint_formula_chunk", "joint_measured_chunk", "vision_fp32", "vision_bf16",
                             "gemm_served", "vision_served", "gemm_fp32", "gemm_bf16", "vision_library",
                             "vision_packed"], 1.0)
    report = format_report({**dict.fromkeys(TARGETS, 1.0), "setup": setup, "seconds": seconds, "targets": TARGETS})
    assert "text tower (trimmed_vs_full) at population 30 x 10 classes, 16 vs 77 tokens" in report
    assert all(name in report for name in TARGETS)
    batched = next(line for line in report.splitlines() if line.startswith("batched_vs_loop"))
    assert batched.split()[3] == "GPU"  # reported on a CPU, not counted as met or missed
    assert next(line for line in report.splitlines() if line.startswith("bf16_vs_fp32")).split()[3] == "NO"
    bound = next(line for line in report.splitlines() if line.startswith("gemm_bf16_vs_fp32")).split()
    assert bound[2:4] == ["-", "-"]  # reported, no target


@pytest.mark.slow
def test_perf_json_at_reduced_sizes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the start-up chunk measurement as `serve` runs it, over two sizes and a short budget (a test's time)
    quick = functools.partial(calibration.measure_batch_images, candidates=(16, 32), budget_s=1.5)
    monkeypatch.setattr(perf, "measure_batch_images", quick)
    code = main(["perf", "--model", "tiny-random", "--population", "2", "--shots", "1", "--classes", "3",
                 "--micro-population", "4", "--text-population", "5", "--repeats", "1", "--dtype-model", "tiny-random",
                 "--dtype-images", "3", "--dtype-population", "2", "--dtype-repeats", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    bf16 = has_fast_bf16(torch.device("cpu")) or result["setup"]["dtype"] == "bfloat16"
    skipped = {"packed_vs_library"} | (set() if bf16 else {"bf16_vs_fp32", "gemm_bf16_vs_fp32"})
    assert set(TARGETS) - skipped <= set(result)
    assert ("packed_vs_library" in result) == packing_available(torch.device("cpu"), torch.float32)
    chunks = result["setup"]["chunks"]
    assert chunks["measured"] in (16, 32) and chunks["formula"] % 32 == 0  # measured among the two; the formula's
    assert all(math.isfinite(result[name]) and result[name] > 0 for name in TARGETS if name in result)
    setup = result["setup"]
    assert (setup["population"], setup["text_population"], setup["images"], setup["classes"]) == (2, 5, 3, 3)
    assert setup["text_tokens"]["full"] == 32 > setup["text_tokens"]["trimmed"]
    assert all(v > 0 for v in result["seconds"].values())
    prec = setup["precision"]
    assert (prec["images"], prec["population"], prec["served_dtype"]) == (3, 2, setup["dtype"])
    assert setup["dtype_repeats"] == 1
    assert result["met"]["batched_vs_loop"] is None and isinstance(result["met"]["http_vs_inprocess"], bool)
    if bf16:
        assert result["met"]["gemm_bf16_vs_fp32"] is None and set(prec["gemm_kernel_seconds"]) >= {"float32", "bfloat16"}
    else:
        assert "emulated" in prec["bf16_skipped"] and "gemm_bf16_vs_fp32" not in result["met"]


@pytest.mark.parametrize("compare", [False, True], ids=["fp32-only", "bf16-too"])
def test_bf16_sides_are_timed_only_when_asked(compare: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fast bf16 the perf run leaves the bf16 ratios out and says why; asked, it times both (a
    small GEMM here: emulated bf16 runs a 4096x1024x1024 product in seconds)."""
    monkeypatch.setattr(roofline, "GEMM_SHAPE", (64, 64, 64))

    def timer(a, b, repeats):  # type: ignore[no-untyped-def]
        a(), b()
        return 1.0, 0.5

    result = roofline.measure_precision(tiny_random_clip(seed=0), torch.float32, images=2, population=1,
                                        timer=timer, repeats=1, compare_bf16=compare)
    assert ("bf16_vs_fp32" in result.ratios) == ("gemm_bf16_vs_fp32" in result.ratios) == compare
    assert ("bf16_skipped" in result.setup) != compare and result.ratios["roofline_fraction"] > 0
    assert set(result.setup["gemm_kernel_seconds"]) == ({"float32", "bfloat16"} if compare else {"float32"})
    seconds = {**dict.fromkeys(["inprocess_joint", "http_joint"], 1.0), **result.seconds}
    setup = {"model": "m", "device": "cpu", "threads": 1, "population": 2, "micro_population": 6, "images": 4,
             "classes": 2, "precision": result.setup}
    report = format_report({"http_vs_inprocess": 1.0, **result.ratios, "setup": setup, "seconds": seconds,
                            "targets": TARGETS})
    assert ("bf16_vs_fp32, gemm_bf16_vs_fp32: not measured" in report) != compare
    assert any(line.startswith("roofline_fraction") for line in report.splitlines())


@pytest.mark.parametrize("pack", [False, True], ids=["library", "packed"])
def test_vision_flops_match_the_formula(pack: bool) -> None:
    """The counter (attention through the math kernel; the packed kernel by its formula) agrees with the
    transformer's FLOP formula."""
    model = PromptedCLIP(tiny_random_clip(seed=0), pack=pack)
    assert model.packed == pack
    cfg, m = model.model.config.vision_config, 5
    patches = (cfg.image_size // cfg.patch_size) ** 2
    seq, d, ff = patches + 1 + m, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * seq * (4 * d * d + 2 * d * ff) + 2 * 2 * seq * seq * d  # q, k, v, out, MLP; QK^T and AV
    conv = 2 * patches * d * cfg.num_channels * cfg.patch_size**2
    projection = 2 * d * model.model.config.projection_dim
    assert vision_flops(model, m) == cfg.num_hidden_layers * per_layer + conv + projection
