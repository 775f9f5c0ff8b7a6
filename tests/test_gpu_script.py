"""The GPU throughput script runs (on CPU, tiny sizes) and reports what BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_throughput.py"


def test_cpu_smoke_run() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--population", "1", "--images", "2",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    assert result["fp32"]["images_per_s"] > 0 and result["fp32"]["tflops"] > 0


def test_flop_count_matches_vit_b32() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_throughput import vision_flops_per_image

    from bptvlm.server.loading import random_vit_b32
    from bptvlm.server.model import PromptedCLIP

    # ViT-B/32 at 224 px is quoted as 4.4 "GFLOPs" per image, counted in multiply-adds (2 FLOPs each).
    flops = vision_flops_per_image(PromptedCLIP(random_vit_b32(0)), prompt_tokens=0)
    assert 4.2e9 < flops / 2 < 4.6e9
